"""A client for a running `regserve dev`'s control API, found through its session file.

`regserve dev` writes `{"controlUrl", "token", "serveUrl", "pid"}` (mode 0600) to the session file while it
runs; this module reads it and creates, reads, lists and deletes RegisteredModelServing resources there.
It needs neither Ray nor Kubernetes: httpx and the standard library only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

SESSION_ENV = "REGSERVE_DEV_SESSION"
# The session file is a few hundred bytes; anything larger is not one.
MAX_SESSION_FILE_BYTES = 64 * 1024
# A list of many resources with long statuses stays well below this.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
# A delete answers once the Serve app is gone (the session waits for Ray up to 60 s) and the MLflow
# tags are removed (up to 10 s).
TIMEOUT = httpx.Timeout(120.0, connect=5.0)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
START_HINT = "start one with `regserve dev` (it may run without -f files)"


class LocalSessionNotFound(Exception):
    """No `regserve dev` runs (no session file, a stale one, or nothing answers)."""


class LocalControlError(Exception):
    """The session refused or failed a request; `message` is its explanation."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"regserve dev answered {status}: {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class LocalSession:
    control_url: str
    token: str
    serve_url: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {
            "controlUrl": self.control_url,
            "token": self.token,
            "serveUrl": self.serve_url,
            "pid": self.pid,
        }

    @classmethod
    def from_json(cls, raw: Any) -> LocalSession:
        """Raises ValueError for anything that is not a session this module would itself write."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        control_url, token, serve_url, pid = (raw.get(k) for k in ("controlUrl", "token", "serveUrl", "pid"))
        if not all(isinstance(v, str) and v for v in (control_url, token, serve_url)):
            raise ValueError("controlUrl, token and serveUrl must be non-empty strings")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError("pid must be a positive integer")
        assert isinstance(control_url, str) and isinstance(token, str) and isinstance(serve_url, str)
        # The token goes only to this machine: a file pointing elsewhere is refused.
        if not is_loopback_http(control_url):
            raise ValueError(f"controlUrl {control_url!r} is not an http URL on this machine")
        return cls(control_url.rstrip("/"), token, serve_url.rstrip("/"), pid)


def is_loopback_http(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return False
    return parsed.scheme == "http" and parsed.host in LOOPBACK_HOSTS and parsed.port is not None


def session_path() -> Path:
    configured = os.environ.get(SESSION_ENV)
    return Path(configured) if configured else Path.home() / ".regserve" / "dev-session.json"


def read_session(path: Path) -> LocalSession:
    """The session in `path`; LocalSessionNotFound when there is none or it is not a session file."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_SESSION_FILE_BYTES + 1)
    except FileNotFoundError:
        raise LocalSessionNotFound(f"no regserve dev session ({path} does not exist); {START_HINT}") from None
    except OSError as error:
        raise LocalSessionNotFound(f"cannot read the session file {path}: {error.strerror}") from None
    if len(data) > MAX_SESSION_FILE_BYTES:
        raise LocalSessionNotFound(f"{path} is not a regserve dev session file (too large)")
    try:
        return LocalSession.from_json(json.loads(data))
    except ValueError as error:
        raise LocalSessionNotFound(f"{path} is not a regserve dev session file: {error}") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive, though not a session of ours
        return True
    return True


class LocalControlClient:
    def __init__(self, session: LocalSession, *, timeout: httpx.Timeout = TIMEOUT) -> None:
        self.session = session
        self.serve_url = session.serve_url
        self._http = httpx.Client(
            base_url=session.control_url,
            headers={"Authorization": f"Bearer {session.token}"},
            timeout=timeout,
            follow_redirects=False,
            # A proxy from the environment must not see the token nor route loopback traffic.
            trust_env=False,
        )

    @classmethod
    def discover(cls, path: Path | None = None) -> LocalControlClient:
        """The client of the session whose file is at `path` (default: `session_path()`)."""
        found = path or session_path()
        session = read_session(found)
        if not pid_alive(session.pid):
            raise LocalSessionNotFound(
                f"the regserve dev session in {found} has ended (pid {session.pid} is gone); {START_HINT}"
            )
        return cls(session)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LocalControlClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ verbs

    def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create or update a RegisteredModelServing (metadata.namespace defaults to "default")."""
        metadata = manifest.get("metadata") if isinstance(manifest.get("metadata"), dict) else {}
        assert isinstance(metadata, dict)
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise LocalControlError(400, "the manifest needs metadata.name")
        namespace = metadata.get("namespace") or "default"
        if not isinstance(namespace, str):
            raise LocalControlError(400, "metadata.namespace must be a string")
        status, body = self._request("PUT", _object_path(namespace, name), json=manifest)
        return _expect_object(status, body)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, body = self._request("GET", _object_path(namespace, name))
        if status == 404:
            return None
        return _expect_object(status, body)

    def list(self, namespace: str | None = None) -> list[dict[str, Any]]:
        params = {"namespace": namespace} if namespace is not None else None
        status, body = self._request("GET", "/resources", params=params)
        if status != 200:
            raise _error(status, body)
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise LocalControlError(status, "the session answered a list without items")
        return items

    def delete(self, namespace: str, name: str) -> bool:
        status, body = self._request("DELETE", _object_path(namespace, name))
        if status == 404:
            return False
        _expect_object(status, body)
        return True

    # ---------------------------------------------------------------------------------- plumbing

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                data = bytearray()
                for chunk in response.iter_bytes():
                    data.extend(chunk)
                    if len(data) > MAX_RESPONSE_BYTES:
                        raise LocalControlError(response.status_code, "the answer is too large")
                status = response.status_code
        except httpx.TransportError as error:
            where = self.session.control_url
            raise LocalSessionNotFound(
                f"no regserve dev answers at {where} ({type(error).__name__}); {START_HINT}"
            ) from None
        try:
            return status, json.loads(bytes(data)) if data else None
        except ValueError:
            return status, {"message": bytes(data[:500]).decode("utf-8", "replace")}


def _object_path(namespace: str, name: str) -> str:
    return f"/resources/{quote(namespace, safe='')}/{quote(name, safe='')}"


def _expect_object(status: int, body: Any) -> dict[str, Any]:
    if status != 200:
        raise _error(status, body)
    if not isinstance(body, dict):
        raise LocalControlError(status, "the session answered something that is not an object")
    return body


def _error(status: int, body: Any) -> LocalControlError:
    """The server's explanation, field errors spelled out one a line."""
    if not isinstance(body, dict):
        return LocalControlError(status, f"HTTP {status}")
    message = str(body.get("message") or body.get("error") or f"HTTP {status}")
    fields = body.get("fields")
    if isinstance(fields, list):
        lines = [
            f"  {field.get('path', '')}: {field.get('message', '')}"
            for field in fields
            if isinstance(field, dict)
        ]
        message = "\n".join([message, *lines])
    return LocalControlError(status, message)
