"""An aiohttp application served from a thread with its own event loop: how local mode, whose main
thread runs the reconcile loop, serves its webhook receiver and its control API."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("regserve.http")


@contextmanager
def serve_on_thread(
    app: web.Application, host: str, port: int, *, name: str, stop_timeout_s: float, in_flight: str
) -> Iterator[int]:
    """Serve `app` on host:port (0: a free port the kernel picks, with no window for another process to
    take it); yields the bound port. `in_flight` is logged when stopping finds a request still running:
    it is dropped, and stopping must not fail."""
    from aiohttp import web

    loop = asyncio.new_event_loop()

    async def start() -> tuple[web.AppRunner, int]:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        return runner, int(runner.addresses[0][1])

    runner, bound = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        yield bound
    finally:
        try:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=stop_timeout_s)
        except TimeoutError:
            log.warning(in_flight)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=stop_timeout_s)
        if not thread.is_alive():
            loop.close()
