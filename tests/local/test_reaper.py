"""The watchdog that cleans up after a parent that could not (sandbox.reaper), with real processes."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from regserve_operator.sandbox.processes import session_members, start, wait_for
from regserve_operator.sandbox.reaper import Reaper

# A parent as `regserve dev` is one: a reaper, then a helper in a session of its own whose child leaves
# its process group (as Ray's workers and HAProxy do), a directory; the pids written for the test.
PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from regserve_operator.sandbox.processes import start
    from regserve_operator.sandbox.reaper import Reaper

    out = Path(sys.argv[1])
    reaper = Reaper.start(out / "reaper.log")
    scratch = out / "scratch"
    scratch.mkdir()
    reaper.remove_dir(scratch)
    helper = start(
        [sys.executable, "-c", "import os, subprocess, sys, time; "
         "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], "
         "preexec_fn=lambda: os.setpgid(0, 0)); time.sleep(600)"],
        log=out / "helper.log",
    )
    reaper.stop_session(helper.pid)
    (out / "pids").write_text(f"{reaper.process.pid} {helper.pid}")
    if sys.argv[2] == "clean":
        reaper.close()
    time.sleep(600)
    """
)


def _parent(tmp_path: Path, mode: str) -> tuple[int, int, int]:
    """Start the parent; returns (parent pid, reaper pid, helper session)."""
    parent = start([sys.executable, "-c", PARENT, str(tmp_path), mode], log=tmp_path / "parent.log")
    pids = tmp_path / "pids"
    wait_for(lambda: pids.exists() and pids.read_text(), timeout=60, message="the parent's pids")
    reaper, helper = map(int, pids.read_text().split())
    wait_for(lambda: len(session_members(helper)) == 2, timeout=60, message="the helper and its child")
    return parent.pid, reaper, helper


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_sigkilled_parent_leaves_no_helper_and_no_directory(tmp_path: Path) -> None:
    parent, reaper, helper = _parent(tmp_path, "kill")
    try:
        assert _alive(reaper) and (tmp_path / "scratch").exists()
        os.kill(parent, signal.SIGKILL)
        wait_for(lambda: not session_members(helper), timeout=30, message="the helper's session to end")
        wait_for(lambda: not _alive(reaper), timeout=30, message="the reaper to exit")
        assert not (tmp_path / "scratch").exists()
        assert "parent gone" in (tmp_path / "reaper.log").read_text()
    finally:
        for pid in [parent, *session_members(helper)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_parent_that_cleaned_up_dismisses_it_and_nothing_is_touched(tmp_path: Path) -> None:
    parent, reaper, helper = _parent(tmp_path, "clean")
    try:
        wait_for(lambda: not _alive(reaper), timeout=30, message="the dismissed reaper to exit")
        os.kill(parent, signal.SIGKILL)
        # The reaper is gone: nothing acts on the parent's death. The helper's session is a witness.
        assert len(session_members(helper)) == 2 and (tmp_path / "scratch").exists()
    finally:
        for pid in [parent, *session_members(helper)]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_close_waits_for_the_reaper(tmp_path: Path) -> None:
    reaper = Reaper.start(tmp_path / "reaper.log")
    reaper.close()
    assert reaper.process.returncode == 0
    with pytest.raises(RuntimeError):
        reaper.remove_dir(tmp_path)
