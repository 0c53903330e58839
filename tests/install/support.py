"""Helpers for the install tests: helm, kubectl and hadolint as subprocesses with deadlines."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "regserve"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
VENV_BIN = ROOT / ".venv" / "bin"


def run(args: Sequence[str | Path], *, stdin: str | None = None, timeout: float = 120) -> str:
    """Runs a command; fails with its output when it exits non-zero."""
    proc = subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout


def run_status(
    args: Sequence[str | Path], *, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )


def helm_template(helm: Path, *values: str, namespace: str = "regserve-system", release: str = "rs") -> str:
    args: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace]
    for value in values:
        args += ["--set", value]
    return run(args)


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    return run([KUBECTL, "--kubeconfig", kubeconfig, *args], stdin=stdin, timeout=timeout)
