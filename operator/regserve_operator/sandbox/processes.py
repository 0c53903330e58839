"""Starting and stopping helper processes in their own process groups, and polling with deadlines.

`start_and_wait` is the one way the demo, local mode, the tests and the benchmarks start a server and
wait for it: a server that dies while starting fails the wait at once, with its exit code and the end of
its log, instead of being polled until the deadline.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOG_TAIL_CHARS = 3000


class ProcessExited(RuntimeError):
    """A process exited while something was waiting for it to become ready."""

    def __init__(self, what: str, returncode: int, tail: str) -> None:
        super().__init__(f"{what} exited with code {returncode} before it was ready; its log ends:\n{tail}")
        self.returncode = returncode
        self.tail = tail


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Above Ray's worker ports (10002-19999 by default) and below the kernel's ephemeral range.
RESERVED_LOW = 20000
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_low() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_for_later() -> int:
    """A free port for a server that binds it some seconds from now, on every address.

    `free_port()` takes one from the kernel's ephemeral range, the range outgoing connections take
    their local ports from: one of them can hold it by the time the server binds (seen: HAProxy's
    stats port, "Address already in use", and local mode without an ingress). This one comes from below
    that range, checked free on every address."""
    rng = random.SystemRandom()
    high = _ephemeral_low() - 1
    for _ in range(50):
        port = rng.randint(RESERVED_LOW, high) if high > RESERVED_LOW else 0
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    return free_port()


def start(
    args: list[str],
    *,
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    inherit_env: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `args` in a new session so that stop() takes its helpers (workers, consumers) with it.

    `env` is added to this process's environment, or is the whole environment without `inherit_env`.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:  # the child holds its own descriptor
        return subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**(os.environ if inherit_env else {}), **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )


def start_and_wait(
    args: list[str],
    *,
    log: Path,
    ready: Callable[[], object],
    what: str,
    timeout: float,
    interval: float = 0.25,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    inherit_env: bool = True,
) -> subprocess.Popen[bytes]:
    """Start `args` (as `start`) and poll `ready` until it returns something truthy.

    Raises ProcessExited as soon as the process exits, TimeoutError at the deadline; either way the
    process group is stopped first, so a failed start leaks nothing.
    """
    process = start(args, log=log, env=env, cwd=cwd, inherit_env=inherit_env)
    try:
        wait_while_running(process, ready, log=log, what=what, timeout=timeout, interval=interval)
    except BaseException:
        stop(process)
        raise
    return process


def wait_while_running(
    process: subprocess.Popen[bytes],
    ready: Callable[[], T | None],
    *,
    log: Path,
    what: str,
    timeout: float,
    interval: float = 0.25,
) -> T:
    """Poll `ready` while `process` runs; ProcessExited the moment it exits."""

    def probe() -> T | None:
        if process.poll() is not None:
            raise ProcessExited(what, process.returncode, log_tail(log))
        return ready()

    try:
        return wait_for(probe, timeout=timeout, interval=interval, message=what)
    except TimeoutError as error:
        raise TimeoutError(f"{error}; its log ends:\n{log_tail(log)}") from None


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError as error:
        return f"(no log: {error})"


def stop(process: subprocess.Popen[bytes], *, timeout: float = 15.0) -> None:
    """Stop `process` (SIGTERM to its group, then its grace time) and everything left in its session.

    Helpers that leave the process group (Ray's workers, the HAProxy Ray Serve starts) stay in the
    session `start` opened, so they go too; nothing outside it is touched.
    """
    if process.poll() is None:
        _kill_group(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    _stop_session(process.pid)
    _kill_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def session_members(session: int) -> list[int]:
    """Live (not zombie) processes in a session, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == session and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _stop_session(session: int, *, grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_members(session):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while session_members(session) and time.monotonic() < deadline:
            time.sleep(0.1)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_for(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.1,
    message: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with `message` at the deadline.

    An exception from the probe means "not yet", except AssertionError and ProcessExited: those are
    definite failures that waiting longer cannot cure.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (AssertionError, ProcessExited):
            raise
        except Exception as error:  # the thing polled is not up yet
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {message} (last error: {last_error})")
