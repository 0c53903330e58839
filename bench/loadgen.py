"""Closed-loop HTTP load generator, run as its own process: `python bench/loadgen.py SPEC_JSON`.

SPEC: {"url", "body" (JSON text), "headers", "concurrency", "duration_s", "warmup_s", "bodies"?}
(`bodies`: (body, headers) pairs used round-robin), or {"cells": [SPEC, ...]}. Prints one JSON line per
cell: requests, errors, rps, p50_ms, p99_ms. aiohttp, one keep-alive connection per worker.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def _worker(
    session: aiohttp.ClientSession,
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    offset: int,
    stop_at: float,
    measure_from: float,
    done: list[tuple[float, float]],
    errors: list[str],
) -> None:
    i = offset
    while True:
        now = time.perf_counter()
        if now >= stop_at:
            return
        body, headers = requests[i % len(requests)]
        i += 1
        started = time.perf_counter()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                ok = response.status == 200
                if not ok and len(errors) < 5:
                    errors.append(f"{response.status}: {(await response.text())[:200]}")
        except (aiohttp.ClientError, TimeoutError) as error:  # a timeout is an error, not a crash
            ok = False
            if len(errors) < 5:
                errors.append(repr(error))
        ended = time.perf_counter()
        # Closed loop: count completions inside the window (a request may have started before it).
        if measure_from <= ended <= stop_at:
            done.append((ended, (ended - started) * 1000 if ok else -1.0))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    base_headers = {"Content-Type": "application/json", **spec.get("headers", {})}
    pairs = spec.get("bodies") or [[spec["body"], {}]]
    requests = [(body.encode(), {**base_headers, **headers}) for body, headers in pairs]
    concurrency = int(spec["concurrency"])
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    done: list[tuple[float, float]] = []
    errors: list[str] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        measure_from = start + float(spec.get("warmup_s", 0.5))
        stop_at = measure_from + float(spec["duration_s"])
        await asyncio.gather(
            *(
                _worker(session, spec["url"], requests, n, stop_at, measure_from, done, errors)
                for n in range(concurrency)
            )
        )
    latencies = [latency for _, latency in done]
    good = [x for x in latencies if x >= 0]
    duration = float(spec["duration_s"])
    return {
        "requests": len(good),
        "errors": len(latencies) - len(good),
        "error_samples": errors,
        "rps": len(good) / duration,
        "p50_ms": _percentile(good, 0.50),
        "p99_ms": _percentile(good, 0.99),
    }


async def run_all(specs: list[dict[str, Any]]) -> None:
    for spec in specs:
        print(json.dumps(await run(spec)), flush=True)


def main() -> None:
    """argv[1]: one spec, or {"cells": [spec, ...]} run one after the other (one process start for all)."""
    spec = json.loads(sys.argv[1])
    asyncio.run(run_all(spec.get("cells", [spec])))


if __name__ == "__main__":
    main()
