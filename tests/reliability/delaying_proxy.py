"""A TCP proxy in front of a real server that can slow down or stall every connection.

It works below HTTP: every chunk a client sends (a request, for the small requests MLflow's clients
make) waits `delay_s` before it goes upstream, and waits for as long as `stall` is set: the client's
connect succeeds and then nothing comes back, which is what a hung server looks like. With `only_from`
set, connections from any other address are closed at once: the server is gone for some clients (the
serving pods) and there for others (the operator).
Runs its own asyncio loop on a thread so synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import TracebackType

from regserve_operator.sandbox.processes import free_port


class DelayingProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = free_port()
        self.delay_s = 0.0
        self.stall = False
        self.only_from: str | None = None
        self.refused = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[asyncio.Task[None], str] = {}
        self._release = asyncio.Event()
        self._release.set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="delaying-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    def __enter__(self) -> DelayingProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.listen_host, self.port), self._loop
        ).result(10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def set(self, *, delay_s: float = 0.0, stall: bool = False, only_from: str | None = None) -> None:
        """Change the behaviour for new connections (stalled ones are released when stall is cleared)."""

        def change() -> None:
            self.delay_s, self.stall, self.only_from = delay_s, stall, only_from
            if only_from is not None:
                # Clients keep connections alive: gone means gone for those already open too.
                for task, peer in list(self._peers.items()):
                    if peer != only_from:
                        task.cancel()
            if stall:
                self._release.clear()
            else:
                self._release.set()

        self._loop.call_soon_threadsafe(change)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        self.connections += 1
        peer = (writer.get_extra_info("peername") or ("",))[0]
        if self.only_from is not None and peer != self.only_from:
            self.refused += 1
            writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]
            return
        self._peers[task] = peer  # type: ignore[index]
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(self._pipe(reader, up_writer, hold=True), self._pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)  # type: ignore[arg-type]
            self._peers.pop(task, None)  # type: ignore[call-overload]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, hold: bool = False
    ) -> None:
        try:
            while data := await reader.read(65536):
                if hold:
                    if self.stall:
                        await self._release.wait()
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(OSError):
                writer.close()
