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
import contextlib
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import httpcore
import httpx
import yaml

from serving_app.compat import Signature, check_signature

log = logging.getLogger(__name__)

DOWNLOAD_URI_PATH = "/api/2.0/mlflow/model-versions/get-download-uri"
ARTIFACTS_PATH = "/api/2.0/mlflow-artifacts/artifacts"
REQUEST_TIMEOUT_S = 10.0  # per read, write and connect; a whole read of a version has READ_DEADLINE_S
READ_DEADLINE_S = 30.0
# What one answer may hold: MLflow's answers here (a search page of 1,000 models, an MLmodel with its
# signature, a requirements list, an artifact listing) are far below it; a larger one is no MLflow's.
ANSWER_MAX_BYTES = 8 * 1024 * 1024

MLFLOW_CLIENT_FAIL_FAST: Mapping[str, str] = MappingProxyType(
    {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    }
)
"""The mlflow client's HTTP settings for a process that must answer, or give up, quickly: MLflow's
defaults retry 7 times with exponential backoff, minutes against a registry that is down. The client
reads them from the environment only. A replica sets them where its pod env sets none; the operator's
child process always has them (`serving_app.mlmodel_client`)."""

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
            transport=transport if transport is not None else BoundedTransport(verify=self.verify()),
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S),
            # A redirect answers 3xx: another host must not get this server's credentials, and
            # MLflow's REST API answers without redirecting.
            follow_redirects=False,
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
    """An MLmodel file's content, checked far enough to be gated and loaded; Unreadable otherwise.

    YAML aliases are refused: MLflow writes none, and a few hundred bytes of aliases nested in one
    another expand into a document that takes minutes and gigabytes to walk ("billion laughs"). A
    parse error is reported by position only: the text came from wherever the version's artifacts
    point, and quoting it would carry another host's answer into status."""
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=YAML_LOADER)):
            raise Unreadable(f"{uri}: no readable MLmodel (YAML aliases are not accepted)")
        document = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise Unreadable(f"{uri}: no readable MLmodel (not YAML{where})") from error
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


# ------------------------------------------------------------------------------- bounded requests


@dataclass(frozen=True)
class Deadline:
    """When a registry call must be over, on the monotonic clock, and the budget it was given."""

    at: float
    seconds: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds, seconds)

    def left(self) -> float:
        return self.at - time.monotonic()


# A request's extension naming its Deadline: `BoundedTransport` enforces it on every socket operation.
DEADLINE_EXTENSION = "regserve.deadline"


@dataclass(frozen=True)
class Answer:
    """A registry answer read whole, within its size cap."""

    status_code: int
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class HasStatus(Protocol):
    """An answer whose body was read: `Answer`, or an httpx.Response after `read()`."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def bounded_request(
    client: httpx.Client,
    method: str,
    path: str,
    *,
    label: str,
    deadline: Deadline,
    max_bytes: int = ANSWER_MAX_BYTES,
    params: Mapping[str, Any] | None = None,
    body: Any = None,
) -> Answer:
    """One request whose answer is complete by `deadline` and at most `max_bytes` long; Unreachable
    otherwise. httpx's timeouts are per socket operation, so a server trickling a byte at a time (or
    an endless body) would hold the caller for ever; the body is streamed and cut at the cap, never
    read into memory past it. Redirects are not followed (the client's default): they answer 3xx."""
    if deadline.left() <= 0:
        raise Unreachable(f"{label}: no complete answer within {deadline.seconds:g} s")
    try:
        with client.stream(
            method,
            path,
            params=params,
            json=body,
            extensions={DEADLINE_EXTENSION: deadline},
        ) as answer:
            declared = answer.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise Unreachable(f"{label}: answer of {int(declared)} bytes, more than {max_bytes}")
            # One buffer, grown in place: the chunks of a cut answer are not kept (an error's traceback
            # holds this frame) and leave no heap of 64 KiB blocks behind.
            received = bytearray()
            for chunk in answer.iter_bytes():
                if len(received) + len(chunk) > max_bytes:
                    del received[:]
                    raise Unreachable(f"{label}: answer longer than {max_bytes} bytes")
                if deadline.left() <= 0:
                    del received[:]
                    raise httpx.ReadTimeout("deadline passed while reading the answer")
                received += chunk
            return Answer(answer.status_code, bytes(received))
    except httpx.TimeoutException as error:
        if deadline.left() > 0.01:  # one read or connect waited REQUEST_TIMEOUT_S for nothing
            raise Unreachable(f"{label}: {type(error).__name__}") from error
        raise Unreachable(f"{label}: no complete answer within {deadline.seconds:g} s") from error
    except httpx.HTTPError as error:
        raise Unreachable(f"{label}: {type(error).__name__}") from error


def redirect_note(status_code: int) -> str:
    return " (a redirect: not followed)" if 300 <= status_code < 400 else ""


class _DeadlineSlot(threading.local):
    """The Deadline of the request this thread is sending or reading, if any."""

    deadline: Deadline | None = None


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every operation waits no longer than the current request's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, slot: _DeadlineSlot) -> None:
        self._inner = inner
        self._slot = slot

    def _bounded(self, timeout: float | None, expired: type[Exception]) -> float | None:
        deadline = self._slot.deadline
        if deadline is None:
            return timeout
        left = deadline.left()
        if left <= 0:
            raise expired(f"deadline of {deadline.seconds:g} s passed")
        return left if timeout is None else min(timeout, left)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        bounded = self._bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, bounded), self._slot)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self, slot: _DeadlineSlot) -> None:
        self._inner = httpcore.SyncBackend()
        self._slot = slot

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        deadline = self._slot.deadline
        if deadline is not None:
            timeout = (
                max(0.0, deadline.left()) if timeout is None else min(timeout, max(0.0, deadline.left()))
            )
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self._slot)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, timeout, socket_options), self._slot)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class _DeadlineBody(httpx.SyncByteStream):
    """A response body whose reads keep the request's deadline."""

    def __init__(self, inner: httpx.SyncByteStream, slot: _DeadlineSlot, deadline: Deadline) -> None:
        self._inner = inner
        self._slot = slot
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._inner)
        while True:
            with _bound(self._slot, self._deadline):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk

    def close(self) -> None:
        self._inner.close()


@contextlib.contextmanager
def _bound(slot: _DeadlineSlot, deadline: Deadline | None) -> Iterator[None]:
    before, slot.deadline = slot.deadline, deadline
    try:
        yield
    finally:
        slot.deadline = before


class BoundedTransport(httpx.HTTPTransport):
    """An HTTP transport that holds a request carrying a Deadline (`DEADLINE_EXTENSION`) to it on
    every socket operation: connect, TLS handshake, sending, and reading the status line, headers and
    body. A server that trickles its headers cannot outlast the deadline either."""

    def __init__(self, *, verify: bool | str = True) -> None:
        # The pool httpx builds here is replaced below: no CA bundle loaded for it (~30 ms).
        super().__init__(verify=False)
        self._slot = _DeadlineSlot()
        # httpx builds its pool with httpcore's default backend and no way to pass another.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify),
            max_connections=httpx.Limits().max_connections,
            max_keepalive_connections=httpx.Limits().max_keepalive_connections,
            keepalive_expiry=httpx.Limits().keepalive_expiry,
            network_backend=_DeadlineBackend(self._slot),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        deadline = request.extensions.get(DEADLINE_EXTENSION)
        if not isinstance(deadline, Deadline):
            return super().handle_request(request)
        with _bound(self._slot, deadline):
            response = super().handle_request(request)
        assert isinstance(response.stream, httpx.SyncByteStream)
        response.stream = _DeadlineBody(response.stream, self._slot, deadline)
        return response


# What a request meets on a pooled connection the other end has closed (no response was read).
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class SharedTransport(BoundedTransport):
    """One connection pool and TLS context for all requests with one TLS setting. A client per request
    with its own transport would build a TLS context each time (~33 ms of CPU even for plain http: most
    of the operator's first reconcile at 1,000 resources, ~30 ms of a replica's cold load) and open a new
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
    deadline_s: float = READ_DEADLINE_S,
) -> MlmodelFile | None:
    """The version's MLmodel (and requirements.txt when asked: advisory, so a version without one
    has none) read through the tracking server's artifact proxy, all of it within `deadline_s`. None
    when the tracking URI is not an HTTP server or the artifacts are not behind its proxy: the mlflow
    client must read them."""
    base = tracking_uri.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return None
    uri = models_uri(name, version)
    deadline = Deadline.after(deadline_s)
    with auth.client(base, transport) as client:
        location = locate(client, auth, name, version, deadline=deadline)
        path = proxied_path(location, base)
        if path is None:
            scheme = urllib.parse.urlparse(location).scheme or "file"
            log.debug("%s: artifacts in a %r store: the mlflow client reads them", uri, scheme)
            return None
        mlmodel = get_answer(
            client, auth, uri, f"{ARTIFACTS_PATH}{path}/MLmodel", missing=Unreadable, deadline=deadline
        )
        document = parse_mlmodel(mlmodel.text, uri)
        requirements = (
            _requirements(client, uri, f"{ARTIFACTS_PATH}{path}/requirements.txt", deadline)
            if with_requirements
            else ()
        )
    return MlmodelFile(source=location, document=document, requirements=requirements)


def locate(
    client: httpx.Client, auth: RegistryAuth, name: str, version: str, *, deadline: Deadline | None = None
) -> str:
    """Where the registry says the version's artifacts are (MLflow 3's logged-model sources resolved)."""
    uri = models_uri(name, version)
    params = {"name": name, "version": version}
    answer = get_answer(client, auth, uri, DOWNLOAD_URI_PATH, params, deadline=deadline)
    return _artifact_uri(answer, uri)


def _artifact_uri(answer: HasStatus, uri: str) -> str:
    try:
        found = answer.json().get("artifact_uri") or ""
    except (ValueError, AttributeError) as error:
        # Something between us and MLflow (a login page?) answered 200: not the registry's answer.
        raise Unreachable(f"{uri}: get-download-uri answered no MLflow JSON") from error
    if not isinstance(found, str):
        raise Unreachable(f"{uri}: get-download-uri answered no MLflow JSON (artifact_uri is no string)")
    return found


def _requirements(client: httpx.Client, uri: str, path: str, deadline: Deadline) -> tuple[str, ...]:
    try:
        answer = bounded_request(client, "GET", path, label=uri, deadline=deadline)
    except Unreachable:
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
    deadline: Deadline | None = None,
) -> Answer:
    """GET `path`, bounded in time (`deadline`, else READ_DEADLINE_S from now) and size; an error
    answer raised as what it means. `missing`: what a 404 means instead (the MLmodel of a version
    whose location resolved is missing: the version is broken, not unknown)."""
    answer = bounded_request(
        client, "GET", path, label=uri, deadline=deadline or Deadline.after(READ_DEADLINE_S), params=params
    )
    if answer.status_code != 200:
        raise_for_answer(answer, auth, uri, path, missing=missing)
    return answer


def raise_for_answer(
    answer: HasStatus,
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
    what = path.rsplit("/", 1)[-1]
    raise Unreachable(f"{uri}: {what} answered HTTP {answer.status_code}{redirect_note(answer.status_code)}")


def _mlflow_error(answer: HasStatus) -> tuple[str, str]:
    try:
        body = answer.json()
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("error_code") or ""), str(body.get("message") or "")
