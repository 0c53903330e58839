"""`make demo` runs `regserve demo`: its guided part must do what it says, end to end, on a fresh workdir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from regserve_operator.sandbox.processes import free_port, start, stop

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_scripted_demo_completes(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    command = [
        sys.executable, "-m", "regserve_operator.cli", "demo", "--scripted",
        "--workdir", str(tmp_path / "demo"), "--mlflow-port", "0",
        "--dashboard-port", str(free_port()), "--serve-port", str(free_port()),
    ]  # fmt: skip
    process = start(command, log=log)
    try:
        process.wait(timeout=900)
    except subprocess.TimeoutExpired:
        pytest.fail(f"demo did not finish in 15 minutes:\n{log.read_text()[-4000:]}")
    finally:
        stop(process)
    transcript = log.read_text()
    assert process.returncode == 0, transcript[-4000:]
    assert "every step did what it should" in transcript
    assert "RolloutSucceeded: version 2 is serving" in transcript
    assert "SignatureIncompatible: version 3 held back" in transcript
    assert "409" in transcript
    # The canary (demo_phrasebook v1 answers "Hallo", v2 "Bonjour"): each step printed as it ran, with
    # the client's answers from both versions, then only the new one; the demo itself checks the shares.
    assert "canary: demo_phrasebook@champion → v2" in transcript
    for weight in (25, 50):
        step = next(
            line for line in transcript.splitlines() if line.strip().startswith(f"Canary {weight}% (v2)")
        )
        assert "v1 'Hallo'" in step and "v2 'Bonjour'" in step, step
    assert "operator: Canary 50% Passed" in transcript
    after = next(line for line in transcript.splitlines() if line.strip().startswith("serving v2 "))
    assert "v2 'Bonjour' 100%" in after, after
    # The smoke-test refusal: v3 held, v2 alone answering meanwhile.
    assert "held: v3 SmokeTestFailed:" in transcript
    assert "versions that answered meanwhile: 2" in transcript
