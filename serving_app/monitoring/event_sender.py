"""A replica's CloudEvents sender: a process of its own (`python -m serving_app.monitoring.event_sender`)
that posts the events its replica hands it, so the HTTP requests they cost are spent outside the
replica's process, as KServe's logger posts from a sidecar.

The sender posts with libcurl's multi interface (`pycurl`), a quarter of the CPU an event than an asyncio
HTTP client in Python (bench/README.md), `CONCURRENT_POSTS` at a time over kept-alive connections; it
follows no redirect, speaks http and https only, verifies TLS against the system's certificates, and
uses no proxy from any environment (it has none).

The replica writes frames to the sender's stdin (a 4-byte length, then a pickle): first the settings
(the receiver's URL and headers, which thus never appear in a command line or an environment), then one
batch of `EventPair`s at a time; the sender answers each batch with one JSON frame on its stdout (how
many were posted, the first refusal's status, the first error's name). Nothing but the replica
that started it writes to its stdin. At the end of its stdin (the replica stopped it, or died) the
sender exits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import ssl
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pycurl

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

# libcurl's errors a receiver's operator would look for, by name (the rest as `CurlError<code>`).
CURL_ERRORS = {
    6: "CouldNotResolveHost",
    7: "CouldNotConnect",
    28: "OperationTimedOut",
    35: "SSLConnectError",
    52: "GotNothing",
    55: "SendError",
    56: "RecvError",
    60: "PeerFailedVerification",
}


def curl_error_name(code: int) -> str:
    return CURL_ERRORS.get(code, f"CurlError{code}")


def read_frame_from(stream: BinaryIO) -> bytes | None:
    """`read_frame` for a blocking stream (the sender's stdin)."""
    head = _read_exactly(stream, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    if size > MAX_FRAME:
        raise FrameTooLarge(f"a frame of {size} bytes")
    body = _read_exactly(stream, size)
    if body is None:
        raise EOFError("the stream ended inside a frame")
    return body


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            if left == size:
                return None
            raise EOFError("the stream ended inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Poster:
    """Posts events through one libcurl multi handle and `CONCURRENT_POSTS` easy handles, reused from
    batch to batch (their connections stay open)."""

    def __init__(self, settings: SenderSettings) -> None:
        self.settings = settings
        self.extra = [f"{name}: {value}" for name, value in settings.headers.items()]
        self.multi = pycurl.CurlMulti()
        self.idle = [self._handle() for _ in range(CONCURRENT_POSTS)]
        verify = ssl.get_default_verify_paths()
        for handle in self.idle:
            if verify.cafile and os.path.exists(verify.cafile):
                handle.setopt(pycurl.CAINFO, verify.cafile)
            if verify.capath and os.path.isdir(verify.capath):
                handle.setopt(pycurl.CAPATH, verify.capath)

    def _handle(self) -> pycurl.Curl:
        handle = pycurl.Curl()
        handle.setopt(pycurl.URL, self.settings.url)
        handle.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        handle.setopt(pycurl.FOLLOWLOCATION, 0)  # the Secret's headers go to the named receiver only
        handle.setopt(pycurl.NOPROXY, "*")
        handle.setopt(pycurl.NOSIGNAL, 1)
        handle.setopt(pycurl.TIMEOUT_MS, int(POST_TIMEOUT_S * 1000))
        handle.setopt(pycurl.CONNECTTIMEOUT_MS, int(POST_TIMEOUT_S * 1000))
        handle.setopt(pycurl.WRITEFUNCTION, len)  # the receiver's body is read and dropped
        return handle

    def post_all(self, pairs: Sequence[EventPair]) -> SendOutcome:
        """Every event of the batch; the outcome names the first refusal and the first error."""
        events = []
        for pair in pairs:
            asked, answered = event_headers(pair, self.settings.origin)
            events += [(asked, pair.asked), (answered, pair.answered)]
        waiting = iter(events)
        busy = 0
        posted, refused, errors = 0, [], []
        while True:
            while self.idle and (event := next(waiting, None)) is not None:
                self.multi.add_handle(self._prepared(self.idle.pop(), *event))
                busy += 1
            if not busy:
                break
            self.multi.select(1.0)
            while self.multi.perform()[0] == pycurl.E_CALL_MULTI_PERFORM:
                pass
            while True:
                queued, succeeded, failed = self.multi.info_read()
                for handle in succeeded:
                    status = int(handle.getinfo(pycurl.RESPONSE_CODE))
                    if status >= 300:
                        refused.append(status)
                    else:
                        posted += 1
                for _failed, code, _message in failed:  # the message may quote the URL: not passed on
                    errors.append(curl_error_name(int(code)))
                for handle in [*succeeded, *(entry[0] for entry in failed)]:
                    self.multi.remove_handle(handle)
                    self.idle.append(handle)
                    busy -= 1
                if not queued:
                    break
        return SendOutcome(
            posted=posted,
            refused_status=refused[0] if refused else None,
            error=errors[0] if errors else None,
        )

    def _prepared(self, handle: pycurl.Curl, headers: dict[str, str], body: bytes) -> pycurl.Curl:
        # `Expect:` off: no 100-continue round trip before a body.
        handle.setopt(pycurl.HTTPHEADER, [*self.extra, *(f"{k}: {v}" for k, v in headers.items()), "Expect:"])
        handle.setopt(pycurl.POSTFIELDS, body)
        return handle

    def close(self) -> None:
        for handle in self.idle:
            handle.close()
        self.multi.close()


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    settings_frame = read_frame_from(stdin)
    if settings_frame is None:
        return
    settings: SenderSettings = pickle.loads(settings_frame)  # only our replica writes this pipe
    poster = Poster(settings)
    try:
        while (payload := read_frame_from(stdin)) is not None:
            outcome = poster.post_all(pickle.loads(payload))
            stdout.write(frame(json.dumps(dataclasses.asdict(outcome)).encode()))
            stdout.flush()
    finally:
        poster.close()


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
