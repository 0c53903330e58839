"""Closed-loop HTTP load from `wrk` (C, epoll; installed by `make bench`), one cell at a time.

Cells come from `bench.common.cell`; each gives requests, errors, error_samples, rps, p50_ms and p99_ms.
wrk drives a small server with a fraction of the CPU an asyncio client needs (on 2 cores the
Python generator took a large share of a core at 1,000 req/s, and took it unevenly from a
one-process server and from a server of several processes), so the servers, not the client, set the
figures. One wrk thread: connections are its keep-alive sockets, one request in flight on each.
A warm-up run of `warmup_s` comes first and is not counted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# `done` runs once per wrk process with the merged statistics; latencies are in microseconds.
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'REGSERVE-WRK {"requests": %d, "status_errors": %d, "socket_errors": %d, "duration_us": %d, '
    .. '"p50_us": %.1f, "p99_us": %.1f}\\n',
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout, summary.duration,
    latency:percentile(50), latency:percentile(99)))
end
"""

# A cell's `bodies`: (body, headers) pairs sent round-robin.
_ROTATE = """
local i = 0
request = function()
  i = i + 1
  local r = requests_[(i % #requests_) + 1]
  return wrk.format("POST", nil, r[2], r[1])
end
"""


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed: `make bench` installs it (Debian package wrk)")
    return found


def lua_string(text: str) -> str:
    """A Lua string literal for any text: bytes outside printable ASCII as decimal escapes."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if 32 <= byte < 127 and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def lua_headers(headers: dict[str, str]) -> str:
    return "{" + ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items()) + "}"


def script_for(spec: dict[str, Any]) -> str:
    """The Lua script of one cell: its request (or requests, round-robin) and the result line."""
    base = {"Content-Type": "application/json", **spec.get("headers", {})}
    pairs = spec.get("bodies")
    if not pairs:
        lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(spec['body'])}"]
        lines += [f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in base.items()]
        return "\n".join(lines) + "\n" + _DONE
    entries = ", ".join(f"{{{lua_string(body)}, {lua_headers({**base, **extra})}}}" for body, extra in pairs)
    return f"requests_ = {{{entries}}}\n" + _ROTATE + _DONE


def _run(spec: dict[str, Any], script: Path, seconds: float) -> dict[str, Any]:
    command = [
        wrk_binary(),
        "-t1",
        f"-c{int(spec['concurrency'])}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        spec["url"],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("REGSERVE-WRK "):
            return dict(json.loads(line.removeprefix("REGSERVE-WRK ")))
    raise RuntimeError(f"wrk gave no result (rc {result.returncode}): {result.stderr[-2000:]}")


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """One measured cell, after its warm-up. wrk takes whole seconds: durations are rounded."""
    with tempfile.TemporaryDirectory(prefix="regserve-wrk-") as tmp:
        script = Path(tmp) / "cell.lua"
        script.write_text(script_for(spec))
        if float(spec.get("warmup_s", 0)) > 0:
            _run(spec, script, float(spec["warmup_s"]))
        raw = _run(spec, script, float(spec["duration_s"]))
    good = raw["requests"] - raw["status_errors"]
    errors = raw["status_errors"] + raw["socket_errors"]
    return {
        "requests": good,
        "errors": errors,
        "error_samples": [f"{errors} non-2xx or socket errors (wrk keeps no bodies)"] if errors else [],
        "rps": good / (raw["duration_us"] / 1e6),
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
    }
