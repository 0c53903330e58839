"""The one way helper servers are started and waited on (sandbox.processes), with real processes."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import ProcessExited, session_members, start, start_and_wait, stop


def test_a_process_that_exits_fails_the_wait_at_once_with_its_code_and_output(tmp_path: Path) -> None:
    script = "import sys; print('listening failed: address in use', flush=True); sys.exit(3)"
    started = time.monotonic()
    with pytest.raises(ProcessExited) as failure:
        start_and_wait(
            [sys.executable, "-c", script],
            log=tmp_path / "server.log",
            ready=lambda: False,
            what="the test server",
            timeout=120,
        )
    assert time.monotonic() - started < 30, "waited on a dead process instead of failing at once"
    assert failure.value.returncode == 3
    assert "listening failed: address in use" in failure.value.tail
    assert "the test server exited with code 3" in str(failure.value)


@pytest.mark.slow  # waits out its 8 s deadline
def test_a_process_never_ready_times_out_with_its_output_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    script = (
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('still warming up', flush=True); time.sleep(600)"
    )
    with pytest.raises(TimeoutError, match="still warming up"):
        start_and_wait(
            [sys.executable, "-c", script],
            log=tmp_path / "server.log",
            ready=lambda: False,
            what="the slow server",
            timeout=8,
        )
    pid = int(pid_file.read_text())
    assert not Path(f"/proc/{pid}").exists() or _zombie(pid), "a server that never came up was left running"


def test_ready_returns_the_running_process(tmp_path: Path) -> None:
    marker = tmp_path / "ready"
    script = f"import time; open({str(marker)!r}, 'w').close(); time.sleep(600)"
    process = start_and_wait(
        [sys.executable, "-c", script], log=tmp_path / "server.log", ready=marker.exists, what="x", timeout=60
    )
    try:
        assert process.poll() is None
    finally:
        stop(process)
    assert process.poll() is not None


def test_stop_takes_helpers_that_left_the_process_group(tmp_path: Path) -> None:
    """Ray's workers and the HAProxy Ray Serve starts leave the group of `ray start` but not its session."""
    child_pid = tmp_path / "child"
    script = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'],"
        " preexec_fn=lambda: os.setpgid(0, 0))\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    process = start([sys.executable, "-c", script], log=tmp_path / "parent.log")
    deadline = time.monotonic() + 60
    while not child_pid.exists() or not child_pid.read_text():
        assert time.monotonic() < deadline, (tmp_path / "parent.log").read_text()
        time.sleep(0.05)
    child = int(child_pid.read_text())
    assert os.getpgid(child) != process.pid and os.getsid(child) == process.pid
    assert set(session_members(process.pid)) == {process.pid, child}

    stop(process, timeout=5)

    assert session_members(process.pid) == []
    assert not Path(f"/proc/{child}").exists() or _zombie(child)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@pytest.mark.slow  # a real `mlflow server` starting up
def test_an_mlflow_server_that_cannot_bind_fails_with_its_error_not_a_timeout(tmp_path: Path) -> None:
    """ProcessExited (not TimeoutError) proves the wait ended when the server died, not at its deadline."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = MlflowServer(root=tmp_path / "mlflow", port=taken.getsockname()[1])
        with pytest.raises(ProcessExited) as failure:
            server.start()
    # (`mlflow server` exits with code 0 after uvicorn's bind error: the exit itself is what counts.)
    assert "address already in use" in failure.value.tail


def test_ports_for_later_come_from_below_the_ephemeral_range_and_are_free_everywhere() -> None:
    import socket

    from regserve_operator.sandbox.processes import RESERVED_LOW, _ephemeral_low, port_for_later

    ports = {port_for_later() for _ in range(20)}
    assert all(RESERVED_LOW <= port < _ephemeral_low() for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("0.0.0.0", port))  # still free: nothing of ours took it
