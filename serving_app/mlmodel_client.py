"""Reading a version's MLmodel with the mlflow client: for artifact stores `mlmodel.read_over_rest`
cannot read (s3://, gs://, runs:/, file paths, a proxy on another host).

mlflow, and the store's client library under it (boto3, google-cloud-storage, ...), take the tracking
server's credentials, the artifact store's keys and their HTTP settings from the process environment
only: `download_artifacts` has no parameter for a token or an AWS key. So:

- a process whose environment already is the registry's reads in process (`read_in_process`): a
  serving replica, whose pod env carries the Secret and which serves one tracking server;
- a process that talks to many registries with different credentials reads in a short-lived child
  process that gets them in its own environment (`read_in_child`): the operator. No request ever
  changes the parent's environment, and the parent never imports mlflow.

`python -I -m serving_app.mlmodel_client` is that child. What it reads comes as JSON on its stdin,
never on its command line (the tracking URI and model name are a tenant's words, and a command line
is world-readable in `/proc`); its environment is built by `serving_app.child_env`, never inherited.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping

from serving_app.child_env import child_environment
from serving_app.mlmodel import (
    MLFLOW_CLIENT_FAIL_FAST,
    MlmodelFile,
    NotFound,
    ReadError,
    RegistryAuth,
    Unreachable,
    Unreadable,
    error_for_answer,
    models_uri,
    parse_mlmodel,
    parse_requirements,
)

log = logging.getLogger(__name__)

# A child imports mlflow (seconds) and, with the fail-fast settings, gives up on a dead registry in
# well under this.
CHILD_TIMEOUT_S = 120.0
# Largest MLmodel or requirements.txt the child reads (real ones are a few KiB).
MAX_FILE_BYTES = 4 * 1024 * 1024

# How the mlflow client words a connection failure it wraps in an MlflowException.
_CONNECTION_MARKERS = ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out")
_OUTCOMES: dict[str, type[ReadError]] = {cls.__name__: cls for cls in (NotFound, Unreachable, Unreadable)}


def classify(error: Exception, uri: str) -> ReadError:
    """What an exception raised by the mlflow client, or by a model's own loading code, means."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(error, ReadError):
        return error
    if isinstance(error, RestException):  # the registry answered, with an error
        return error_for_answer(str(error.error_code), error.message)(f"{uri}: {error.message}")
    if isinstance(error, MlflowException):
        if error_for_answer(str(error.error_code), error.message) is NotFound:
            return NotFound(f"{uri}: {error.message}")
        if any(marker in str(error) for marker in _CONNECTION_MARKERS):
            return Unreachable(f"{uri}: the registry is unreachable")
        return Unreadable(f"{uri}: {error.message}")
    if isinstance(error, OSError):
        return Unreachable(f"{uri}: {type(error).__name__}: {error}")
    return Unreadable(f"{uri}: {type(error).__name__}: {error}")


def read_in_process(
    tracking_uri: str, name: str, version: str, *, with_requirements: bool = False
) -> MlmodelFile:
    """Download only the MLmodel (and requirements.txt when asked) with this process's mlflow client.

    mlflow 3.17 resolves `models:/` URIs with its process-wide registry URI whatever
    `download_artifacts` is told, so this process must be set to `tracking_uri` already."""
    uri = models_uri(name, version)
    mlmodel, requirements = _download(tracking_uri, uri, with_requirements)
    return MlmodelFile(
        source=uri,
        document=parse_mlmodel(mlmodel, uri),
        requirements=parse_requirements(requirements or ""),
    )


def _download(tracking_uri: str, uri: str, with_requirements: bool) -> tuple[str, str | None]:
    """The texts of MLmodel and (when asked and present) requirements.txt."""
    import mlflow

    def text_of(path: str, dst: str) -> str:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{uri}/{path}", dst_path=dst, tracking_uri=tracking_uri, registry_uri=tracking_uri
        )
        if os.path.getsize(local) > MAX_FILE_BYTES:
            raise Unreadable(f"{uri}: its {path} is larger than {MAX_FILE_BYTES} bytes")
        with open(local, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    with tempfile.TemporaryDirectory(prefix="regserve-mlmodel-") as tmp:
        try:
            mlmodel = text_of("MLmodel", tmp)
        except Exception as error:
            raise classify(error, uri) from error
        requirements = None
        if with_requirements:
            try:
                requirements = text_of("requirements.txt", os.path.join(tmp, "requirements"))
            except Exception:  # advisory: a version without one has no requirements
                requirements = None
    return mlmodel, requirements


def read_in_child(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    credentials: Mapping[str, str],
    with_requirements: bool = False,
    timeout_s: float = CHILD_TIMEOUT_S,
) -> MlmodelFile:
    """`read_in_process` in a child process whose environment is only the allowed `credentials` (see
    `serving_app.child_env`), the tracking server and the fail-fast settings."""
    uri = models_uri(name, version)
    if importlib.util.find_spec("mlflow") is None:
        raise Unreachable(
            f"{uri}: its artifacts are outside the tracking server's artifact proxy, and reading them "
            "needs the mlflow package (plus the store's client library), which is not installed here"
        )
    fixed = {
        **MLFLOW_CLIENT_FAIL_FAST,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
    }
    request = {
        "tracking_uri": tracking_uri,
        "name": name,
        "version": version,
        "requirements": with_requirements,
    }
    with tempfile.TemporaryDirectory(prefix="regserve-child-") as home:
        env = child_environment(credentials, path=os.environ.get("PATH", os.defpath), home=home, fixed=fixed)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-m", __name__],
                input=json.dumps(request),
                env=env,
                cwd=home,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise Unreachable(f"{uri}: the mlflow client gave no answer in {timeout_s:.0f} s") from error
    return _answer_of(done, uri, RegistryAuth.of(credentials))


def _answer_of(done: subprocess.CompletedProcess[str], uri: str, auth: RegistryAuth) -> MlmodelFile:
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        log.warning("%s: the mlflow client failed: %s", uri, auth.scrub(done.stderr[-2000:]))
        raise Unreachable(f"{uri}: the mlflow client exited with status {done.returncode}") from None
    if "error" in answer:
        raise _OUTCOMES.get(answer["error"], Unreachable)(auth.scrub(str(answer["message"]))[:1024])
    return MlmodelFile(
        source=uri,
        document=parse_mlmodel(answer["mlmodel"], uri),
        requirements=parse_requirements(answer["requirements"] or ""),
    )


def main(request_text: str) -> int:
    request = json.loads(request_text)
    tracking_uri, uri = (
        str(request["tracking_uri"]),
        models_uri(str(request["name"]), str(request["version"])),
    )
    try:
        mlmodel, requirements = _download(tracking_uri, uri, bool(request.get("requirements")))
        answer = {"mlmodel": mlmodel, "requirements": requirements}
    except ReadError as error:
        answer = {"error": type(error).__name__, "message": str(error)}
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.stdin.read()))
