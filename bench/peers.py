"""MLServer with the MLflow runtime, the serving peer (KServe's and Seldon's MLflow runtime), for the benches.

`mlserver` + `mlserver-mlflow` 1.7.1 (Apache-2.0) live in a virtualenv of their own, created on first use
and cached by the hash of its pins under ~/.cache/regserve-bench/mlserver-<hash> (env
REGSERVE_BENCH_CACHE overrides the root): mlserver 1.7.1 wants fastapi < 0.116 and protobuf < 7, which
the project's own pins exceed, so it cannot share the project's virtualenv. What both must agree on for
a fair comparison (mlflow, numpy, pandas, scikit-learn, uvloop; transformers/torch/sentencepiece for the
tiny T5) is pinned to the versions in constraints.txt.

`MLServer(...).start()` writes settings.json (`parallel_workers: 0`: inference in the server process;
1.7.1's parallel worker processes die on current uvloop, see `PARALLEL_WORKERS_NOTE`) and one
model-settings.json per model (`mlserver_mlflow.MLflowRuntime` on a local model directory, optionally
with adaptive batching), then runs `mlserver start` in its own process group. It answers MLflow's
`/invocations` and the Open Inference Protocol's `/v2/models/<name>/infer`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from regserve_operator.sandbox.processes import free_port, start, stop, wait_for

from bench.common import REPO

VERSION = "1.7.1"
PACKAGES = (f"mlserver=={VERSION}", f"mlserver-mlflow=={VERSION}")
# Same versions as the project's environment (constraints.txt), so both servers run the same model code.
SHARED = ("mlflow", "mlflow-skinny", "mlflow-tracing", "numpy", "pandas", "scikit-learn", "uvloop")
SHARED_T5 = ("transformers", "torch", "sentencepiece")
PARALLEL_WORKERS_NOTE = (
    "mlserver 1.7.1 with parallel_workers > 0 on uvloop 0.23: the inference worker processes die at start "
    "(\"There is no current event loop in thread 'MainThread'\"), so the bench runs parallel_workers 0"
)


def _pins(names: tuple[str, ...]) -> list[str]:
    pinned = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pinned[name.strip().lower().replace("_", "-")] = f"{name.strip()}=={version.strip()}"
    missing = [n for n in names if n not in pinned]
    if missing:
        raise RuntimeError(f"constraints.txt pins none of {missing}")
    return [pinned[n] for n in names]


def requirements(with_t5: bool) -> list[str]:
    return [*PACKAGES, *_pins(SHARED), *(_pins(SHARED_T5) if with_t5 else [])]


def cache_root() -> Path:
    return Path(os.environ.get("REGSERVE_BENCH_CACHE", Path.home() / ".cache" / "regserve-bench"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_venv(with_t5: bool, *, log: Path | None = None) -> Path:
    """The MLServer virtualenv for these pins (built once; a half-built one is rebuilt). Returns its bin."""
    reqs = requirements(with_t5)
    key = hashlib.sha256(json.dumps([sys.version_info[:3], reqs]).encode()).hexdigest()[:16]
    venv = cache_root() / f"mlserver-{key}"
    done = venv / ".complete"
    with _locked(cache_root() / f"mlserver-{key}.lock"):
        if done.exists():
            return venv / "bin"
        shutil.rmtree(venv, ignore_errors=True)
        base = getattr(sys, "_base_executable", sys.executable)
        out = log.open("ab") if log else subprocess.DEVNULL
        try:
            subprocess.run([base, "-m", "venv", str(venv)], check=True, stdout=out, stderr=out)
            pip = [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--no-input",
                "--progress-bar",
                "off",
            ]
            subprocess.run([*pip, *reqs], check=True, stdout=out, stderr=out, timeout=3600)
        finally:
            if log:
                assert not isinstance(out, int)
                out.close()
        done.write_text("\n".join(reqs) + "\n")
    return venv / "bin"


@dataclass
class ModelSpec:
    name: str  # MLServer's model name (the /v2/models/<name> path)
    model_dir: Path  # a local MLflow model directory (MLmodel at its root)
    max_batch_size: int = 1
    max_batch_time_s: float = 0.0

    def settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "name": self.name,
            "implementation": "mlserver_mlflow.MLflowRuntime",
            "parameters": {"uri": str(self.model_dir)},
        }
        if self.max_batch_size > 1:
            settings |= {"max_batch_size": self.max_batch_size, "max_batch_time": self.max_batch_time_s}
        return settings


@dataclass
class MLServer:
    """`mlserver start` on a directory of model-settings, HTTP on a free loopback port (gRPC and metrics
    on free ports too), in its own process group."""

    bin: Path
    models: list[ModelSpec]
    workdir: Path
    parallel_workers: int = 0
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"mlserver-{self.port}.log"

    def write_settings(self) -> Path:
        root = self.workdir / f"mlserver-{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        settings = {
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "parallel_workers": self.parallel_workers,
            "debug": False,
        }
        (root / "settings.json").write_text(json.dumps(settings, indent=2))
        for model in self.models:
            folder = root / model.name
            folder.mkdir(exist_ok=True)
            (folder / "model-settings.json").write_text(json.dumps(model.settings(), indent=2))
        return root

    def start(self, timeout: float = 300) -> MLServer:
        self.launch()
        return self.wait(timeout)

    def launch(self) -> None:
        root = self.write_settings()
        env = {"PATH": f"{self.bin}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": "", "PYTHONPATH": ""}
        env["VIRTUAL_ENV"] = str(self.bin.parent)
        self.process = start(
            [str(self.bin / "mlserver"), "start", str(root)], log=self.log, env=env, cwd=root
        )

    def wait(self, timeout: float = 300) -> MLServer:
        try:
            wait_for(self._ready, timeout=timeout, interval=0.5, message=f"MLServer on {self.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"mlserver exited; see {self.log}:\n{self.log_tail()}")
        for model in self.models:
            if httpx.get(f"{self.url}/v2/models/{model.name}/ready", timeout=2).status_code != 200:
                return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def v2_request(case_key: str, record: Any) -> dict[str, Any]:
    """The Open Inference Protocol body for one record of the bench's models."""
    if case_key == "sklearn":
        return {
            "inputs": [{"name": "input-0", "shape": [1, len(record)], "datatype": "FP64", "data": record}]
        }
    return {
        "inputs": [
            {"name": column, "shape": [1], "datatype": _v2_datatype(value), "data": [value]}
            for column, value in record.items()
        ]
    }


def _v2_datatype(value: Any) -> str:
    return "FP64" if isinstance(value, float) else "BYTES"
