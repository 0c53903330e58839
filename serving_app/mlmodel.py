"""Reading a registry version's MLmodel file: one reader for the operator and the serving app.

One rule decides how. MLflow's REST API says where the version's artifacts are (`get-download-uri`,
which also resolves MLflow 3's `models:/m-<id>` logged-model sources). When that is the tracking
server's own artifact proxy (`mlflow-artifacts:` without a host or with this server's host, the
default for `mlflow server`), the files come through the proxy: two or three plain HTTP requests and
no mlflow import (`read_over_rest`). Any other location (s3://, gs://, runs:/, file paths, a proxy on
another host, which must not receive this server's credentials) needs the store's own client
libraries: `read_over_rest` answers None and the caller reads it with the mlflow client
(`serving_app.mlmodel_client`).

One error mapping, three outcomes each caller translates into its own vocabulary:

- `Unreachable`: no answer, an answer that is not MLflow's, a 5xx, credentials refused: nothing is
  known about the version, and asking again later may work;
- `NotFound`: the registry says there is no such model or version;
- `Unreadable`: the version exists but its MLmodel is missing or is no MLmodel. A verdict on the
  version, not an outage; also a ValueError.

Nothing here imports mlflow, so the operator reads facts without it.
"""

from __future__ import annotations

import base64
import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx
import yaml

from serving_app.compat import Signature, check_signature

log = logging.getLogger(__name__)

DOWNLOAD_URI_PATH = "/api/2.0/mlflow/model-versions/get-download-uri"
ARTIFACTS_PATH = "/api/2.0/mlflow-artifacts/artifacts"
REQUEST_TIMEOUT_S = 10.0

MLFLOW_CLIENT_FAIL_FAST: Mapping[str, str] = MappingProxyType(
    {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
)
"""The mlflow client's HTTP settings for a process that must answer, or give up, quickly: MLflow's
defaults retry 7 times with exponential backoff, minutes against a registry that is down. The client
reads them from the environment only; they are defaults, values already set there win
(`with_fail_fast`)."""

YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Error codes with which MLflow says "no such thing". INVALID_PARAMETER_VALUE too, when it is about
# the version (e.g. one that is not a number); otherwise it is a request the registry refused.
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})

# MLflow's own names for the tracking server's credentials and TLS settings.
AUTH_KEYS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


def with_fail_fast(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the fail-fast settings added where it sets none."""
    return {**MLFLOW_CLIENT_FAIL_FAST, **env}


def models_uri(name: str, version: str) -> str:
    return f"models:/{name}/{version}"


# ------------------------------------------------------------------------------------------ errors


class ReadError(Exception):
    """A version's MLmodel could not be read."""


class Unreachable(ReadError):
    """The registry did not answer the question: nothing is known about the version."""


class NotFound(ReadError):
    """The registry answered: no such model or version."""


class Unreadable(ReadError, ValueError):
    """The version exists, but its MLmodel is missing or is not an MLmodel."""


def error_for_answer(code: str, message: str) -> type[ReadError]:
    """What an error answer from the registry (MLflow's `error_code` and message) means here."""
    if code in _NOT_FOUND_CODES or (code == "INVALID_PARAMETER_VALUE" and "version" in message.lower()):
        return NotFound
    return Unreachable


# ------------------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class RegistryAuth:
    """How requests to a tracking server authenticate, from environment-style keys as the mlflow
    client reads them (`AUTH_KEYS`). Any other keys given (artifact-store secrets) are only scrubbed
    from messages. Values never show in repr."""

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, env: Mapping[str, str]) -> RegistryAuth:
        return cls(tuple(sorted(env.items())))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> RegistryAuth:
        """The tracking-server settings a process was started with (a serving replica's pod env)."""
        return cls.of({key: environ[key] for key in AUTH_KEYS if environ.get(key)})

    def __repr__(self) -> str:
        return f"RegistryAuth(keys={[key for key, _ in self.items]})"

    def verify(self) -> bool | str:
        """TLS verification as MLflow's settings ask: a CA bundle path, off, or the system's."""
        env = dict(self.items)
        if env.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            return False
        return env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or True

    def client(self, base_url: str, transport: httpx.BaseTransport | None = None) -> httpx.Client:
        env = dict(self.items)
        headers, auth = {}, None
        if env.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {env['MLFLOW_TRACKING_TOKEN']}"
        elif env.get("MLFLOW_TRACKING_USERNAME"):
            auth = httpx.BasicAuth(env["MLFLOW_TRACKING_USERNAME"], env.get("MLFLOW_TRACKING_PASSWORD", ""))
        return httpx.Client(
            base_url=base_url,
            headers=headers,
            auth=auth,
            verify=self.verify(),
            transport=transport,
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S),
        )

    def scrub(self, text: str) -> str:
        """`text` without any of the values (or the Basic-auth encoding of the user and password)."""
        env = dict(self.items)
        secrets = [value for value in env.values() if len(value) >= 4]
        if env.get("MLFLOW_TRACKING_USERNAME"):
            pair = f"{env['MLFLOW_TRACKING_USERNAME']}:{env.get('MLFLOW_TRACKING_PASSWORD', '')}"
            secrets.append(base64.b64encode(pair.encode()).decode())
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


# ----------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class MlmodelFile:
    """A version's MLmodel as read, and where to load the version from."""

    source: str  # the artifact URI when known, else the version's `models:/` URI
    document: Mapping[str, Any]
    requirements: tuple[str, ...] = ()

    @property
    def signature(self) -> Signature | None:
        """As MLmodel stores it (`ModelSignature.to_dict()`): what `serving_app.compat` compares."""
        signature: Signature | None = self.document.get("signature")
        return signature

    @property
    def flavors(self) -> tuple[str, ...]:
        return tuple(sorted(self.document.get("flavors") or {}))

    @property
    def model_size_bytes(self) -> int | None:
        size = self.document.get("model_size_bytes")
        return int(size) if size is not None else None


def parse_mlmodel(text: str, uri: str) -> dict[str, Any]:
    """An MLmodel file's content, checked far enough to be gated and loaded; Unreadable otherwise."""
    try:
        document = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as error:
        raise Unreadable(f"{uri}: no readable MLmodel (not YAML: {error})"[:1024]) from error
    if not isinstance(document, dict):
        raise Unreadable(f"{uri}: no readable MLmodel (not a YAML mapping)")
    signature = document.get("signature")
    if signature is not None and not isinstance(signature, dict):
        raise Unreadable(f"{uri}: no readable MLmodel (its signature is not a mapping)")
    try:
        check_signature(signature)
    except ValueError as error:
        raise Unreadable(f"{uri}: no readable MLmodel ({error})") from error
    return document


def parse_requirements(text: str) -> tuple[str, ...]:
    """The requirement lines of a requirements.txt (no comments, no pip options)."""
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith(("#", "-")))


def proxied_path(location: str, tracking_uri: str) -> str | None:
    """The URL-quoted artifact path under ARTIFACTS_PATH when `location` is behind the artifact proxy
    of the server at `tracking_uri`; None otherwise (the mlflow client must read it). A proxy on
    another host is left to the mlflow client: this server's credentials do not go to other hosts."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme != "mlflow-artifacts":
        return None
    if parsed.netloc and parsed.netloc.lower() != urllib.parse.urlparse(tracking_uri).netloc.lower():
        return None
    path = parsed.path.strip("/")
    return "/" + urllib.parse.quote(path) if path else ""


# What a request meets on a pooled connection the other end has closed (no response was read).
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class SharedTransport(httpx.HTTPTransport):
    """One connection pool and TLS context for all requests with one TLS setting. A client per request
    with its own transport built a TLS context each time (~33 ms of CPU even for plain http: most of a
    first reconcile at 1,000 resources in the operator, 30 ms of a replica's cold load) and a new
    connection. The per-request clients that use it close nothing; `shutdown` does.

    A pooled connection can be closed by the server (or a proxy in between) while a request is on its
    way: the server's idle timeout counts from its last response, not from when the client picked the
    connection. httpx retries only failed connects, so such a request is sent once more on a fresh
    connection. Everything sent through it is idempotent (searches, reads, tag writes)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return super().handle_request(request)
        except STALE_CONNECTION_ERRORS:
            log.debug(
                "%s %s: pooled connection was closed under the request; sending again",
                request.method,
                request.url,
            )
            return super().handle_request(request)

    def close(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def shutdown(self) -> None:
        super().close()


def read_over_rest(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    auth: RegistryAuth,
    with_requirements: bool = False,
    transport: httpx.BaseTransport | None = None,
) -> MlmodelFile | None:
    """The version's MLmodel (and requirements.txt when asked: advisory, so a version without one
    has none) read through the tracking server's artifact proxy. None when the tracking URI is not an
    HTTP server or the artifacts are not behind its proxy: the mlflow client must read them."""
    base = tracking_uri.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None
    uri = models_uri(name, version)
    with auth.client(base, transport) as client:
        location = locate(client, auth, name, version)
        path = proxied_path(location, base)
        if path is None:
            scheme = urllib.parse.urlparse(location).scheme or "file"
            log.debug("%s: artifacts in a %r store: the mlflow client reads them", uri, scheme)
            return None
        mlmodel = get_answer(client, auth, uri, f"{ARTIFACTS_PATH}{path}/MLmodel", missing=Unreadable)
        document = parse_mlmodel(mlmodel.text, uri)
        requirements = (
            _requirements(client, f"{ARTIFACTS_PATH}{path}/requirements.txt") if with_requirements else ()
        )
    return MlmodelFile(source=location, document=document, requirements=requirements)


def locate(client: httpx.Client, auth: RegistryAuth, name: str, version: str) -> str:
    """Where the registry says the version's artifacts are (MLflow 3's logged-model sources resolved)."""
    uri = models_uri(name, version)
    answer = get_answer(client, auth, uri, DOWNLOAD_URI_PATH, {"name": name, "version": version})
    return _artifact_uri(answer, uri)


def _artifact_uri(answer: httpx.Response, uri: str) -> str:
    try:
        return str(answer.json().get("artifact_uri") or "")
    except (ValueError, AttributeError) as error:
        # Something between us and MLflow (a login page?) answered 200: not the registry's answer.
        raise Unreachable(f"{uri}: get-download-uri answered no MLflow JSON") from error


def _requirements(client: httpx.Client, path: str) -> tuple[str, ...]:
    try:
        answer = client.get(path)
    except httpx.HTTPError:
        return ()
    return parse_requirements(answer.text) if answer.status_code == 200 else ()


def get_answer(
    client: httpx.Client,
    auth: RegistryAuth,
    uri: str,
    path: str,
    params: Mapping[str, str] | None = None,
    *,
    missing: type[ReadError] | None = None,
) -> httpx.Response:
    """GET `path`; an error answer raised as what it means. `missing`: what a 404 means instead (the
    MLmodel of a version whose location resolved is missing: the version is broken, not unknown)."""
    try:
        answer = client.get(path, params=params)
    except httpx.HTTPError as error:
        raise Unreachable(f"{uri}: {type(error).__name__}") from error
    if answer.status_code != 200:
        raise_for_answer(answer, auth, uri, path, missing=missing)
    return answer


def raise_for_answer(
    answer: httpx.Response,
    auth: RegistryAuth,
    uri: str,
    path: str,
    *,
    missing: type[ReadError] | None = None,
) -> None:
    """Raise what a non-200 answer to `path` means (its body read already)."""
    if missing is not None and answer.status_code == 404:
        raise missing(f"{uri}: no {urllib.parse.unquote(path.rsplit('/', 1)[-1])} in its artifacts")
    code, message = _mlflow_error(answer)
    if error_for_answer(code, message) is NotFound:
        # MLflow's own sentence ("Model Version (name=m, version=9) not found"), scrubbed all the same.
        raise NotFound(auth.scrub(f"{uri}: {message or code}")[:300])
    # Never echo other bodies: an auth proxy may reflect headers.
    raise Unreachable(f"{uri}: {path.rsplit('/', 1)[-1]} answered HTTP {answer.status_code}")


def _mlflow_error(answer: httpx.Response) -> tuple[str, str]:
    try:
        body = answer.json()
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("error_code") or ""), str(body.get("message") or "")
