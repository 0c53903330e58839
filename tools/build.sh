#!/usr/bin/env bash
# Builds the test control plane's binaries from Go modules, cached by version outside the work tree:
# etcd, one multi-call kube-apiserver/-controller-manager/-scheduler, kwok, KubeRay's operator, helm.
# Idempotent: a binary that exists for its pinned version is reused, so a warm run takes seconds.
# Concurrent runs (two `make test`s) wait for each other instead of compiling twice on 2 cores.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
TOOLS_DIR="${REGSERVE_TOOLS_DIR:-$HOME/.cache/regserve-tools}"
BIN="$TOOLS_DIR/bin"
WORK="$TOOLS_DIR/src"
mkdir -p "$BIN" "$WORK"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod CGO_ENABLED=0
LDFLAGS_BASE="-s -w"

if ! command -v go >/dev/null; then
    echo "tools: go is not installed; the test control plane is built from Go modules" >&2
    exit 1
fi

exec 9>"$TOOLS_DIR/.build.lock"
if ! flock -n 9; then
    echo "tools: another build is running; waiting for it"
    flock 9
fi

phase() { # name, binary path, command...
    local name="$1" out="$2"; shift 2
    if [[ -x "$out" ]]; then echo "tools: $name cached ($out)"; return; fi
    echo "tools: building $name ..."
    local start=$SECONDS ticks=0 rc=0
    # In the background so errexit stays on inside the build function (it is off in `cmd || ...`),
    # and so a heartbeat shows that a long compile is alive.
    "$@" &
    local job=$!
    while kill -0 "$job" 2>/dev/null; do
        sleep 1
        ticks=$((ticks + 1))
        if ((ticks % 60 == 0)) && kill -0 "$job" 2>/dev/null; then
            echo "tools: ... $name still building ($((SECONDS - start)) s)"
        fi
    done
    wait "$job" || rc=$?
    if ((rc != 0)); then
        echo "tools: $name FAILED after $((SECONDS - start)) s (exit $rc)" >&2
        return "$rc"
    fi
    echo "tools: $name built in $((SECONDS - start)) s"
}

build_etcd() {
    local dir="$WORK/etcd-$ETCD_VERSION"
    mkdir -p "$dir"
    # etcd's own go.mod has local replaces, so `go install` of it fails: build it from a wrapper module.
    cat > "$dir/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    cd "$dir"
    rm -f go.mod go.sum
    go mod init regserve.local/etcd >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
    go mod tidy >/dev/null
    go build -trimpath -ldflags "$LDFLAGS_BASE" -o "$BIN/etcd-$ETCD_VERSION.tmp" .
    mv "$BIN/etcd-$ETCD_VERSION.tmp" "$BIN/etcd-$ETCD_VERSION"
}

build_kube() {
    local dir="$WORK/kube-$KUBERNETES_VERSION"
    mkdir -p "$dir"
    cat > "$dir/main.go" <<'GO'
// One multi-call binary for kube-apiserver, kube-controller-manager and kube-scheduler:
// one compile and one link instead of three. Call it as `kube-multi-<v> kube-apiserver <flags>`
// or through a symlink named after the component.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	name := filepath.Base(os.Args[0])
	if strings.HasPrefix(name, "kube-multi") && len(os.Args) > 1 {
		name = os.Args[1]
		os.Args = append(os.Args[:1], os.Args[2:]...)
	}
	var command *cobra.Command
	switch {
	case strings.HasPrefix(name, "kube-apiserver"):
		command = apiserver.NewAPIServerCommand()
	case strings.HasPrefix(name, "kube-controller-manager"):
		command = controllermanager.NewControllerManagerCommand()
	case strings.HasPrefix(name, "kube-scheduler"):
		command = scheduler.NewSchedulerCommand()
	default:
		fmt.Fprintf(os.Stderr, "unknown program %q: call as kube-apiserver, kube-controller-manager or kube-scheduler\n", name)
		os.Exit(2)
	}
	os.Exit(cli.Run(command))
}
GO
    cd "$dir"
    rm -f go.mod go.sum
    go mod init regserve.local/kube >/dev/null 2>&1
    # k8s.io/kubernetes points its staging modules at ./staging/src/...: replace each with its
    # published version, as listed by the real go.mod.
    local mod
    mod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
    {
        echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
        grep -E '=> ./staging/src/' "$mod" \
            | awk -v v="$KUBERNETES_STAGING_VERSION" '{print "replace " $1 " => " $1 " " v}'
    } >> go.mod
    local minor ver
    minor="$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
    ver="-X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION"
    ver="$ver -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
    ver="$ver -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
    go mod tidy >/dev/null
    go build -trimpath -ldflags "$LDFLAGS_BASE $ver" -o "$BIN/kube-multi-$KUBERNETES_VERSION.tmp" .
    mv "$BIN/kube-multi-$KUBERNETES_VERSION.tmp" "$BIN/kube-multi-$KUBERNETES_VERSION"
}

go_install() { # module@version, binary name, output name
    local gobin="$WORK/gobin-$3"
    mkdir -p "$gobin"
    GOBIN="$gobin" go install -trimpath -ldflags "$LDFLAGS_BASE" "$1"
    mv "$gobin/$2" "$BIN/$3"
}

build_in_module() { # module@version, output name: `go build` inside the downloaded module itself.
    # For modules whose version list the proxy refuses (KubeRay): `go install m@v` looks up deprecation
    # notices in that list and fails; a build with the module as main module does not, and uses its go.sum.
    local dir
    dir="$(go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
    cd "$dir"
    GOFLAGS=-mod=readonly go build -trimpath -ldflags "$LDFLAGS_BASE" -o "$BIN/$2.tmp" .
    mv "$BIN/$2.tmp" "$BIN/$2"
}

link_module() { # module@version, link name: the module's source (KubeRay CRDs, KWOK stages)
    local dir
    dir="$(go mod download -json "$1" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')"
    [[ -d "$dir" ]] || { echo "tools: module $1 not downloaded" >&2; return 1; }
    ln -sfn "$dir" "$TOOLS_DIR/$2"
}

total=$SECONDS
phase etcd "$BIN/etcd-$ETCD_VERSION" build_etcd
phase kwok "$BIN/kwok-$KWOK_VERSION" go_install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" kwok "kwok-$KWOK_VERSION"
phase helm "$BIN/helm-$HELM_VERSION" go_install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" helm "helm-$HELM_VERSION"
phase kuberay "$BIN/kuberay-operator-$KUBERAY_VERSION" build_in_module \
    "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" "kuberay-operator-$KUBERAY_VERSION"
phase kube "$BIN/kube-multi-$KUBERNETES_VERSION" build_kube
# KubeRay's CRDs and KWOK's stages come from the same module downloads as the binaries.
[[ -d "$TOOLS_DIR/ray-operator-$KUBERAY_VERSION" ]] \
    || link_module "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" "ray-operator-$KUBERAY_VERSION"
[[ -d "$TOOLS_DIR/kwok-$KWOK_VERSION" ]] || link_module "sigs.k8s.io/kwok@$KWOK_VERSION" "kwok-$KWOK_VERSION"
echo "tools: ready in $TOOLS_DIR (total $((SECONDS - total)) s)"
