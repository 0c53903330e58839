"""A replica's CloudEvents sender: a process of its own (`python -m serving_app.monitoring.event_sender`)
that posts the events its replica hands it, so the HTTP requests they cost are spent outside the
replica's process, as KServe's logger posts from a sidecar.

The replica writes frames to the sender's stdin (a 4-byte length, then a pickle): first the settings
(the receiver's URL and headers, which thus never appear in a command line or an environment), then one
batch of `EventPair`s at a time; the sender answers each batch with one JSON frame on its stdout (how
many were posted, the first refusal's status, the first error's type name). Nothing but the replica
that started it writes to its stdin. At the end of its stdin (the replica stopped it, or died) the
sender exits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from serving_app.monitoring.cloudevents_format import EventPair, EventSource, event_headers

logger = logging.getLogger("ray.serve")

POST_TIMEOUT_S = 10.0
CONCURRENT_POSTS = 8
STOP_TIMEOUT_S = 5.0
_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30


@dataclass(frozen=True)
class SenderSettings:
    url: str
    headers: dict[str, str]
    origin: EventSource


@dataclass(frozen=True)
class SendOutcome:
    posted: int
    refused_status: int | None = None  # the first event the receiver refused: its status
    error: str | None = None  # the first event that did not reach the receiver: the error's type


class FrameTooLarge(ValueError):
    pass


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload; None at the end of the stream."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as ended:
        if ended.partial:
            raise
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise FrameTooLarge(f"a frame of {size} bytes")
    return await reader.readexactly(size)


def _sender_environment() -> dict[str, str]:
    # The sender needs to find Python's packages and this one; nothing else of the replica's
    # environment (which may hold the receiver's headers) goes with it.
    package_root = str(Path(__file__).resolve().parents[2])
    return {"PATH": os.environ.get("PATH", os.defpath), "PYTHONPATH": package_root}


class SenderProcess:
    """The replica's handle on its sender process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._lost = False  # a frame was half written or half read: the streams are out of step

    @classmethod
    async def start(cls, settings: SenderSettings) -> SenderProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "serving_app.monitoring.event_sender",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_sender_environment(),
        )
        sender = cls(process)
        await sender._write(pickle.dumps(settings))
        return sender

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.returncode is None and not self._lost

    async def send(self, pairs: Sequence[EventPair]) -> SendOutcome:
        """Hands one batch over and waits for its outcome."""
        assert self.process.stdout is not None
        try:
            await self._write(pickle.dumps(list(pairs), protocol=pickle.HIGHEST_PROTOCOL))
            reply = await read_frame(self.process.stdout)
        except BaseException:
            self._lost = True
            self.kill()
            raise
        if reply is None:
            self._lost = True
            return SendOutcome(0, error="SenderExited")
        return SendOutcome(**json.loads(reply))

    async def _write(self, payload: bytes) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(frame(payload))
        await self.process.stdin.drain()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()

    async def stop(self) -> None:
        """Ends the sender's stdin and waits for it to exit; kills it when it does not in time."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.kill()
            await self.process.wait()


# ------------------------------------------------------------------------------ the sender's side


async def post_all(
    session: aiohttp.ClientSession, settings: SenderSettings, pairs: Sequence[EventPair]
) -> SendOutcome:
    """Every event of the batch, `CONCURRENT_POSTS` at a time."""
    gate = asyncio.Semaphore(CONCURRENT_POSTS)
    refused: list[int] = []
    errors: list[str] = []

    async def post(headers: dict[str, str], body: bytes) -> bool:
        try:
            # No redirects: the Secret's headers go to the receiver named in the spec and nowhere else.
            async with (
                gate,
                session.post(
                    settings.url, data=body, headers={**settings.headers, **headers}, allow_redirects=False
                ) as answer,
            ):
                await answer.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            errors.append(type(error).__name__)
            return False
        if answer.status >= 300:
            refused.append(answer.status)
            return False
        return True

    posts = []
    for pair in pairs:
        asked, answered = event_headers(pair, settings.origin)
        posts += [post(asked, pair.asked), post(answered, pair.answered)]
    delivered = await asyncio.gather(*posts)
    return SendOutcome(
        posted=sum(delivered),
        refused_status=refused[0] if refused else None,
        error=errors[0] if errors else None,
    )


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    settings_frame = await read_frame(reader)
    if settings_frame is None:
        return
    settings: SenderSettings = pickle.loads(settings_frame)  # only our replica writes this pipe
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while (payload := await read_frame(reader)) is not None:
            pairs: list[EventPair] = pickle.loads(payload)
            outcome = await post_all(session, settings, pairs)
            writer.write(frame(json.dumps(dataclasses.asdict(outcome)).encode()))
            await writer.drain()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    await serve(reader, writer)


if __name__ == "__main__":
    asyncio.run(main())
