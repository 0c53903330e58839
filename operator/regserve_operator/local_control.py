"""The control API of a running `regserve dev`: create, read, list and delete resources while it runs.

An aiohttp server on 127.0.0.1 (a free port) on a thread of its own, every request authenticated by the
session's random bearer token. It speaks Kubernetes-shaped RegisteredModelServing objects:

    GET    /resources[?namespace=NS]         {"items": [object, ...]}
    GET    /resources/{namespace}/{name}     object, or 404
    PUT    /resources/{namespace}/{name}     a manifest; the stored object (422: the spec's field errors)
    DELETE /resources/{namespace}/{name}     the object as it was, or 404

The session file (`local_client.session_path()`) tells clients where the API is and holds the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
from pydantic import ValidationError

from regserve_operator.local_client import LocalSession, LocalSessionNotFound, pid_alive, read_session
from regserve_operator.spec import GROUP, KIND, VERSION, RegisteredModelServingSpec, parse_spec
from regserve_operator.threaded_http import serve_on_thread

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("regserve.dev.control")

API_VERSION = f"{GROUP}/{VERSION}"
MAX_BODY_BYTES = 1024 * 1024
# Kubernetes' own rule for namespaces (RFC 1123 labels); names of this kind are also Serve app names.
NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# How long a session file's control URL gets to answer before the file counts as stale.
LIVENESS_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 10.0


# ------------------------------------------------------------------------------------------- decide


@dataclass(frozen=True)
class Refusal(Exception):
    """A request refused: HTTP `status`, a stable `error` code, a readable `message`, field errors."""

    status: int
    error: str
    message: str
    fields: tuple[dict[str, str], ...] = ()

    def body(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"error": self.error, "message": self.message}
        if self.fields:
            answer["fields"] = list(self.fields)
        return answer


def check_name(what: str, value: str) -> None:
    if not NAME_PATTERN.fullmatch(value):
        raise Refusal(
            400, "InvalidName", f"{what} must be a lowercase RFC 1123 label (a-z, 0-9, '-', at most 63)"
        )


def manifest_spec(manifest: Any, namespace: str, name: str) -> RegisteredModelServingSpec:
    """The spec of a manifest PUT at /resources/{namespace}/{name}; raises Refusal when it is not one.

    As the API server does, a manifest without metadata.namespace takes the path's."""
    check_name("the namespace", namespace)
    check_name("the name", name)
    if not isinstance(manifest, dict):
        raise Refusal(400, "BadRequest", "the body must be a JSON object (a RegisteredModelServing)")
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise Refusal(
            400,
            "BadRequest",
            f"expected apiVersion {API_VERSION} and kind {KIND}, got "
            f"{_shown(manifest.get('apiVersion'))} and {_shown(manifest.get('kind'))}",
        )
    metadata = manifest.get("metadata")
    if not isinstance(metadata, dict):
        raise Refusal(400, "BadRequest", "metadata must be an object with name (and namespace)")
    if metadata.get("name") != name:
        raise Refusal(
            400,
            "BadRequest",
            f"metadata.name ({_shown(metadata.get('name'))}) does not match the name in the URL ({name})",
        )
    if metadata.get("namespace", namespace) != namespace:
        raise Refusal(
            400,
            "BadRequest",
            f"metadata.namespace ({_shown(metadata.get('namespace'))}) does not match the namespace in the "
            f"URL ({namespace})",
        )
    raw_spec = manifest.get("spec")
    if not isinstance(raw_spec, dict):
        raise Refusal(422, "Invalid", "spec must be an object", ({"path": "spec", "message": "required"},))
    try:
        return parse_spec(raw_spec)
    except ValidationError as error:
        raise Refusal(422, "Invalid", f"{KIND} {namespace}/{name} is invalid", field_errors(error)) from None


def field_errors(error: ValidationError) -> tuple[dict[str, str], ...]:
    """pydantic's errors as {path, message, type}; the offending input is not echoed back."""
    return tuple(
        {
            "path": ".".join(["spec", *(str(part) for part in detail["loc"])]),
            "message": detail["msg"],
            "type": detail["type"],
        }
        for detail in error.errors(include_url=False, include_input=False, include_context=False)
    )


def _shown(value: Any) -> str:
    """A value from a request, for a message: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def authorized(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    return hmac.compare_digest(presented.strip().encode(), token.encode())


class Verdict(Enum):
    START = "start"  # no session, or a stale file to replace
    REFUSE = "refuse"  # a live session owns the file


def session_verdict(found: LocalSession | None, *, process_alive: bool, answers: bool) -> Verdict:
    """Whether `regserve dev` may start with this session file in place."""
    if found is None or not process_alive or not answers:
        return Verdict.START
    return Verdict.REFUSE


# ------------------------------------------------------------------------------------------ backend


class ControlBackend(Protocol):
    """What the API drives: the dev session. Methods block (run off the event loop)."""

    def put_object(
        self, namespace: str, name: str, spec: RegisteredModelServingSpec, applied: dict[str, Any]
    ) -> dict[str, Any]: ...

    def get_object(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list_objects(self, namespace: str | None) -> list[dict[str, Any]]: ...

    def delete_object(self, namespace: str, name: str) -> dict[str, Any] | None: ...


# ------------------------------------------------------------------------------------------- server


class ControlApi:
    """The routes; each request's blocking work runs on the loop's executor, never on the loop."""

    def __init__(self, backend: ControlBackend, token: str) -> None:
        self._backend = backend
        self._token = token

    def app(self) -> web.Application:
        from aiohttp import web

        @web.middleware
        async def guard(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            return await self._guard(request, handler)

        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[guard])
        app.router.add_get("/resources", self._list)
        app.router.add_get("/resources/{namespace}/{name}", self._get)
        app.router.add_put("/resources/{namespace}/{name}", self._put)
        app.router.add_delete("/resources/{namespace}/{name}", self._delete)
        return app

    @staticmethod
    def _refused(refusal: Refusal) -> web.Response:
        from aiohttp import web

        response = web.json_response(refusal.body(), status=refusal.status)
        if refusal.status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @staticmethod
    async def _blocking(call: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, call)

    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        from aiohttp import web

        if not authorized(request.headers.get("Authorization"), self._token):
            return self._refused(
                Refusal(401, "Unauthorized", "a bearer token from the session file is needed")
            )
        try:
            return await handler(request)
        except Refusal as refusal:
            return self._refused(refusal)
        except web.HTTPException:
            raise
        except Exception as error:  # the session keeps running; the client gets the reason
            log.exception("control API: %s %s failed", request.method, request.path)
            return self._refused(Refusal(500, "InternalError", f"{type(error).__name__}: {error}"))

    async def _list(self, request: web.Request) -> web.Response:
        from aiohttp import web

        namespace = request.query.get("namespace")
        if namespace is not None:
            check_name("the namespace", namespace)
        items = await self._blocking(lambda: self._backend.list_objects(namespace))
        return web.json_response({"apiVersion": API_VERSION, "kind": f"{KIND}List", "items": items})

    async def _get(self, request: web.Request) -> web.Response:
        from aiohttp import web

        namespace, name = _path_key(request)
        found = await self._blocking(lambda: self._backend.get_object(namespace, name))
        if found is None:
            raise _not_found(namespace, name)
        return web.json_response(found)

    async def _put(self, request: web.Request) -> web.Response:
        from aiohttp import web

        namespace, name = _path_key(request)
        raw = await request.read()  # bounded by client_max_size: 413 beyond it
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise Refusal(400, "BadRequest", "the body is not JSON") from None
        spec = manifest_spec(manifest, namespace, name)
        applied = dict(manifest["spec"])
        stored = await self._blocking(lambda: self._backend.put_object(namespace, name, spec, applied))
        return web.json_response(stored)

    async def _delete(self, request: web.Request) -> web.Response:
        from aiohttp import web

        namespace, name = _path_key(request)
        gone = await self._blocking(lambda: self._backend.delete_object(namespace, name))
        if gone is None:
            raise _not_found(namespace, name)
        return web.json_response(gone)


def _path_key(request: web.Request) -> tuple[str, str]:
    namespace, name = request.match_info["namespace"], request.match_info["name"]
    check_name("the namespace", namespace)
    check_name("the name", name)
    return namespace, name


def _not_found(namespace: str, name: str) -> Refusal:
    return Refusal(404, "NotFound", f"{KIND} {namespace}/{name} not found")


@contextlib.contextmanager
def control_server(backend: ControlBackend, token: str, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve the control API on `host`, a free port, from a thread with its own event loop; yields its URL."""
    with serve_on_thread(
        ControlApi(backend, token).app(),
        host,
        0,
        name="regserve-control",
        stop_timeout_s=STOP_TIMEOUT_S,
        in_flight="control API stopped with a request in flight",
    ) as port:
        yield f"http://{host}:{port}"


# ------------------------------------------------------------------------------------- session file


def answers(session: LocalSession) -> bool:
    """Whether the session's control API answers to its token (not merely something on that port)."""
    try:
        response = httpx.get(
            f"{session.control_url}/resources",
            headers={"Authorization": f"Bearer {session.token}"},
            timeout=LIVENESS_TIMEOUT_S,
            trust_env=False,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def live_session(path: Path) -> LocalSession | None:
    """The session that owns `path` now, None if there is none (no file, unreadable, or stale)."""
    try:
        found = read_session(path)
    except LocalSessionNotFound:
        return None
    alive = pid_alive(found.pid)
    verdict = session_verdict(found, process_alive=alive, answers=alive and answers(found))
    return found if verdict is Verdict.REFUSE else None


def refuse_if_live(path: Path) -> None:
    found = live_session(path)
    if found is not None:
        raise SystemExit(
            f"regserve dev already runs (pid {found.pid}, control API {found.control_url}, session file "
            f"{path}); stop it first, or give this one another --session-file"
        )


@dataclass
class SessionFile:
    """The session file this process wrote: 0600 in a directory created 0700; removed on `remove()`."""

    path: Path
    session: LocalSession
    written: bool = field(default=False, init=False)

    def write(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(self.session.to_json(), file)
        # A rename: a reader sees the old file or the whole new one, never half of it.
        os.replace(temporary, self.path)
        self.written = True

    def remove(self) -> None:
        """Remove the file if it is still ours (another session may have replaced a file it found stale)."""
        if not self.written:
            return
        try:
            current = read_session(self.path)
        except LocalSessionNotFound:
            return
        if current == self.session:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.written = False


@contextlib.contextmanager
def session_file(path: Path, session: LocalSession) -> Iterator[SessionFile]:
    written = SessionFile(path, session)
    # A session that started meanwhile (between the first check and now) keeps its file.
    refuse_if_live(path)
    written.write()
    try:
        yield written
    finally:
        written.remove()
