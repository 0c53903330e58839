"""A hostile MLflow stand-in on loopback: every way a tracking server can answer badly, one per path.

A tracking URI `http://127.0.0.1:<port>/<mode>` gets, for any request under it:

- `trickle`: a 200 whose JSON body comes one byte every `trickle_interval_s` (each byte well within
  a per-read timeout, the whole answer never);
- `trickle-headers`: the status line, then the headers one byte every `trickle_interval_s`;
- `endless`: well-formed search pages, each with a new `next_page_token`, for ever;
- `endless-large`: the same, each page padded to LARGE_PAGE_BYTES (under the per-page cap: only a
  budget for the whole pass stops it);
- `huge`: a 200 JSON answer of 1 GiB, generated as it is sent (never held in memory), no length
  declared; `huge-declared`: the same with its `Content-Length`;
- `login`: a 200 `text/html` sign-in page;
- `redirect`: a 302 to the same path on another listener (`other`), which counts what reaches it;
- `malformed`: JSON whose fields have the wrong types; `bad-version`: a version that is no number.

Plain asyncio on its own thread: HTTP/1.1 with `Connection: close`, request line and headers only
(the registry's calls here carry no body the stand-in needs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from types import TracebackType

from regserve_operator.sandbox.processes import free_port

MODES = (
    "trickle",
    "trickle-headers",
    "endless",
    "huge",
    "huge-declared",
    "login",
    "redirect",
    "malformed",
    "bad-version",
)
# Not in MODES (whose resources the promotion benchmark runs beside): asked for by name.
EXTRA_MODES = ("endless-large",)
HUGE_BYTES = 1 << 30
LARGE_PAGE_BYTES = 4 << 20
CHUNK = 1 << 16
PAGE = {"registered_models": [{"name": "hostile", "aliases": [{"alias": "champion", "version": "1"}]}]}


class HostileMlflow:
    def __init__(self, *, trickle_interval_s: float = 1.0) -> None:
        self.trickle_interval_s = trickle_interval_s
        self.port = free_port()
        self.other_port = free_port()
        self.requests: Counter[str] = Counter()
        self.other_requests = 0
        self.huge_bytes_sent = 0
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="hostile-mlflow", daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}"

    def __enter__(self) -> HostileMlflow:
        self._thread.start()

        async def listen() -> None:
            self._servers.append(await asyncio.start_server(self._serve, "127.0.0.1", self.port))
            self._servers.append(await asyncio.start_server(self._other, "127.0.0.1", self.other_port))

        asyncio.run_coroutine_threadsafe(listen(), self._loop).result(10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _other(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.other_requests += 1
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode("ascii", "replace")
            path = target.split("?", 1)[0]
            mode = path.strip("/").split("/", 1)[0]
            self.requests[mode] += 1
            await self._answer(mode, target, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()
            self._tasks.discard(task)

    async def _answer(self, mode: str, target: str, writer: asyncio.StreamWriter) -> None:
        if mode == "trickle":
            body = json.dumps(PAGE).encode() + b" " * 100_000
            writer.write(_head(200, "application/json", len(body)))
            await self._trickle(body, writer)
        elif mode == "trickle-headers":
            writer.write(b"HTTP/1.1 200 OK\r\n")
            await self._trickle(b"X-Padding: " + b"a" * 100_000 + b"\r\n\r\n", writer)
        elif mode == "endless":
            page = dict(PAGE, next_page_token=f"page-{self.requests[mode]}")
            await _send(writer, 200, "application/json", json.dumps(page).encode())
        elif mode == "endless-large":
            page = dict(PAGE, next_page_token=f"page-{self.requests[mode]}")
            body = json.dumps(page).encode()
            await _send(writer, 200, "application/json", body + b" " * (LARGE_PAGE_BYTES - len(body)))
        elif mode in ("huge", "huge-declared"):
            writer.write(_head(200, "application/json", HUGE_BYTES if mode == "huge-declared" else None))
            writer.write(b'{"registered_models": [')
            blank = b" " * CHUNK
            for _ in range(HUGE_BYTES // CHUNK):
                writer.write(blank)
                await writer.drain()
                self.huge_bytes_sent += CHUNK
        elif mode == "login":
            await _send(writer, 200, "text/html", b"<html><body><form>Sign in</form></body></html>")
        elif mode == "redirect":
            location = f"http://127.0.0.1:{self.other_port}{target}"
            writer.write(_head(302, "text/plain", 0, extra=f"Location: {location}\r\n"))
            await writer.drain()
        elif mode == "malformed":
            wrong = {"registered_models": [{"name": 7, "aliases": "champion"}], "next_page_token": 3}
            await _send(writer, 200, "application/json", json.dumps(wrong).encode())
        elif mode == "bad-version":
            odd = {"registered_models": [{"name": "m", "aliases": [{"alias": "a", "version": "1;x"}]}]}
            await _send(writer, 200, "application/json", json.dumps(odd).encode())
        else:
            await _send(writer, 404, "application/json", b'{"error_code": "ENDPOINT_NOT_FOUND"}')

    async def _trickle(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        await writer.drain()
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(self.trickle_interval_s)


def _head(status: int, content_type: str, length: int | None, *, extra: str = "") -> bytes:
    reason = {200: "OK", 302: "Found", 404: "Not Found"}[status]
    declared = f"Content-Length: {length}\r\n" if length is not None else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n{declared}{extra}"
        "Connection: close\r\n\r\n"
    ).encode()


async def _send(writer: asyncio.StreamWriter, status: int, content_type: str, body: bytes) -> None:
    writer.write(_head(status, content_type, len(body)) + body)
    await writer.drain()
