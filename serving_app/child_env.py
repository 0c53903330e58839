"""The environment of a child process that reads a registry with the mlflow client.

A process's environment is code: `PYTHONPATH` (with a `sitecustomize.py` on it), `PYTHONHOME`,
`LD_PRELOAD`, `HOME` and `TMPDIR` (where it reads its configuration and writes), proxies, a cloud
SDK's config-file, credential-process and web-identity settings each change what runs, where it
writes, or whose identity it uses. The keys of a resource's credentials Secret are written by a
tenant, so the child never inherits the operator's environment and never takes a key that is not on
`ALLOWED_KEYS`: the names the mlflow client and the artifact stores it reads from take as *values*
(tokens, passwords, access keys, endpoints, regions). Names that point at files, commands or other
identities are left out on purpose, as is everything else; `split` says which keys were left out so
the resource's status can name them.

What the child does get besides: the operator's own `PATH` (to find nothing but its interpreter's
helpers), a fresh `HOME` and `TMPDIR` of its own (so no `~/.aws`, `~/.config/gcloud` or
`~/.netrc` of the operator's is read), and the cloud SDKs' instance-identity look-ups switched off
(`AWS_EC2_METADATA_DISABLED`, `NO_GCE_CHECK`), so a Secret without keys cannot borrow the
operator's node or pod identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# mlflow/environment_variables.py and mlflow/utils/rest_utils.py (3.17): the tracking server's
# credentials and how its TLS is checked. MLFLOW_TRACKING_AUTH (names an auth plugin to load),
# MLFLOW_TRACKING_CLIENT_CERT_PATH (presents a file of the operator's) and the MLFLOW_HTTP_REQUEST_*
# retry settings (the child's own fail-fast settings win) are left out.
MLFLOW_KEYS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_AWS_SIGV4",
)
# mlflow/store/artifact/s3_artifact_repo.py and botocore's environment provider: static keys, region
# and endpoint. Left out: AWS_PROFILE, AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE (a config
# file's `credential_process` runs a command), AWS_ROLE_ARN with AWS_WEB_IDENTITY_TOKEN_FILE (the
# operator's own web identity), AWS_CONTAINER_CREDENTIALS_* (credentials fetched from a URL),
# AWS_CA_BUNDLE (a file of the operator's).
S3_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_S3_IGNORE_TLS",
    "MLFLOW_S3_EXPECTED_BUCKET_OWNER",
    "MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE",
)
# mlflow/store/artifact/azure_blob_artifact_repo.py (connection string, account key, SAS token) and
# azure-identity's EnvironmentCredential (a service principal's secret). AZURE_AUTHORITY_HOST and
# AZURE_CLIENT_CERTIFICATE_PATH are left out.
AZURE_KEYS = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
)
# google-auth takes a service account only as a file (GOOGLE_APPLICATION_CREDENTIALS, a path: left
# out), so GCS artifacts must be behind the tracking server's artifact proxy for the operator.
GCS_KEYS = ("GOOGLE_CLOUD_PROJECT",)

ALLOWED_KEYS = frozenset((*MLFLOW_KEYS, *S3_KEYS, *AZURE_KEYS, *GCS_KEYS))

# Set in every child whatever the Secret says: no instance-metadata identity to fall back on.
NO_AMBIENT_IDENTITY = {"AWS_EC2_METADATA_DISABLED": "true", "NO_GCE_CHECK": "True"}

# Longest value taken; anything longer is no credential (and a child's environment is bounded).
MAX_VALUE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Split:
    """A Secret's keys sorted into what a child may get and what it never sees."""

    allowed: Mapping[str, str]
    ignored: tuple[str, ...]  # key names only: their values are never shown


def split(credentials: Mapping[str, str]) -> Split:
    """`credentials` cut down to `ALLOWED_KEYS` (values up to `MAX_VALUE_BYTES`, no NUL byte)."""
    allowed: dict[str, str] = {}
    ignored: list[str] = []
    for key, value in credentials.items():
        usable = len(value.encode("utf-8", "surrogatepass")) <= MAX_VALUE_BYTES and "\0" not in value
        if key in ALLOWED_KEYS and usable:
            allowed[key] = value
        else:
            ignored.append(key)
    return Split(allowed=allowed, ignored=tuple(sorted(ignored)))


def child_environment(
    credentials: Mapping[str, str],
    *,
    path: str,
    home: str,
    fixed: Mapping[str, str],
) -> dict[str, str]:
    """The whole environment of a child: the allowed credentials, then `fixed` (the tracking URI and
    the fail-fast settings, which no Secret overrides), then what the process itself needs. `path`
    is the operator's own PATH; `home` a directory of the child's own (also its TMPDIR)."""
    return {
        **split(credentials).allowed,
        **fixed,
        **NO_AMBIENT_IDENTITY,
        "PATH": path,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONNOUSERSITE": "1",
    }
