{{/* Chart name. */}}
{{- define "regserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-regserve unless the release name already contains it. */}}
{{- define "regserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "regserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels. */}}
{{- define "regserve.labels" -}}
helm.sh/chart: {{ include "regserve.chart" . }}
{{ include "regserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: regserve
{{- end }}

{{- define "regserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "regserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "regserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "regserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Watched namespaces in `namespaces` mode, as a list (release namespace when none given). */}}
{{- define "regserve.watchNamespaces" -}}
{{- $ns := .Values.watch.namespaces | default (list .Release.Namespace) | uniq }}
{{- toJson $ns }}
{{- end }}

{{/* The operator's RBAC rules (generated from regserve_operator.rbac into files/rbac-rules.yaml). */}}
{{- define "regserve.rules" -}}
{{- .Files.Get "files/rbac-rules.yaml" | fromYaml | toJson }}
{{- end }}
