"""A watchdog that cleans up after a process that died without doing it itself (SIGKILL, a crash).

The parent holds the write end of a pipe and the watchdog blocks reading the other end. However the
parent ends, the kernel closes its descriptors, so the watchdog reads end-of-file and then stops the
sessions and removes the directories it was told about. A clean stop says `exit` first, and the
watchdog leaves without touching anything.

Why not `prctl(PR_SET_PDEATHSIG)` on each child: it reaches only that child, and it fires when the
*thread* that started the child ends, not the process. `ray start --block` makes its own daemons share
its fate that way, but Ray's workers and the HAProxy Ray Serve starts leave its process group and live
on; only the session `start` opened holds them all (see `processes.stop`). The watchdog runs in a
session of its own, so a signal to the parent's group or terminal does not take it along.

Messages are JSON lines: `{"session": sid}`, `{"forget": sid}`, `{"dir": path}`, `{"exit": true}`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from regserve_operator.sandbox.processes import session_members

# Between SIGTERM and SIGKILL: Ray's daemons flush and remove their own files in this time.
GRACE_S = 5.0


@dataclass
class Reaper:
    """The parent's side: a running watchdog and the pipe it listens on."""

    process: subprocess.Popen[bytes]
    pipe: IO[str] | None = field(repr=False)

    @classmethod
    def start(cls, log: Path) -> Reaper:
        read_end, write_end = os.pipe()  # both non-inheritable: no other child holds the write end
        log.parent.mkdir(parents=True, exist_ok=True)
        try:
            with log.open("ab") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "regserve_operator.sandbox.reaper", str(read_end)],
                    stdin=subprocess.DEVNULL,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    pass_fds=(read_end,),
                    start_new_session=True,
                    env={**os.environ, "PYTHONPATH": _import_path()},
                )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        return cls(process, os.fdopen(write_end, "w", buffering=1))

    def stop_session(self, session: int) -> None:
        """Stop every process of `session` if this process dies first."""
        self._send({"session": session})

    def forget(self, session: int) -> None:
        """The session was stopped cleanly: its id may be reused, so it must not be stopped later."""
        self._send({"forget": session})

    def remove_dir(self, path: Path) -> None:
        self._send({"dir": str(path)})

    def close(self) -> None:
        """Everything was cleaned up by its owner: the watchdog leaves without acting."""
        if self.pipe is not None:
            with contextlib.suppress(OSError):
                self._send({"exit": True})
            with contextlib.suppress(OSError):
                self.pipe.close()
            self.pipe = None
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def _send(self, message: dict[str, object]) -> None:
        if self.pipe is None:
            raise RuntimeError("the reaper was closed")
        self.pipe.write(json.dumps(message) + "\n")
        self.pipe.flush()


def _import_path() -> str:
    """This package's root first, so the watchdog runs the same code wherever it is started from."""
    root = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH", "")]))


# --------------------------------------------------------------------------------------- watchdog


@dataclass
class Orders:
    sessions: set[int] = field(default_factory=set)
    dirs: list[Path] = field(default_factory=list)
    dismissed: bool = False

    def take(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if isinstance(message.get("session"), int):
            self.sessions.add(message["session"])
        elif isinstance(message.get("forget"), int):
            self.sessions.discard(message["forget"])
        elif isinstance(message.get("dir"), str):
            self.dirs.append(Path(message["dir"]))
        elif message.get("exit") is True:
            self.dismissed = True


def stop_sessions(sessions: set[int], *, grace: float = GRACE_S) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for session in sessions:
            for pid in session_members(session):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while any(session_members(s) for s in sessions) and time.monotonic() < deadline:
            time.sleep(0.1)


def watch(read_end: int) -> Orders:
    orders = Orders()
    with os.fdopen(read_end, "r") as pipe:
        for line in pipe:  # ends at EOF: the parent is gone (or closed the pipe after `exit`)
            orders.take(line)
            if orders.dismissed:
                break
    if not orders.dismissed:
        print(f"reaper: parent gone; stopping sessions {sorted(orders.sessions)}", flush=True)
        stop_sessions(orders.sessions)
        for path in orders.dirs:
            shutil.rmtree(path, ignore_errors=True)
    return orders


def main(argv: list[str]) -> int:
    # Ctrl-C in the parent's terminal is for the parent; this process acts only when the parent is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch(int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
