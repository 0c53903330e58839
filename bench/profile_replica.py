"""Where a replica's time goes at c=1: py-spy samples of regserve's and the bare deployment's replicas.

    .venv/bin/python -m bench.profile_replica [--ingress haproxy] [--seconds 15] [--cold 8]
        [--concurrency 32 --batch 32]

Same sklearn model, same ingress mode, one at a time under c=1 load from wrk (bench/wrk.py) while
`py-spy record` samples the replica process (idle threads excluded). Prints, per replica, the share of
samples under each of a few buckets (the `predict` itself, pandas/numpy conversion, regserve's
request handling, FastAPI/Starlette, Ray Serve's replica machinery) and the top frames; writes the
collapsed stacks and a flame graph SVG to bench/results/.

With `--cold N` it profiles N first requests pinned to versions never loaded before instead (one at a
time, idle threads included, so waiting on the registry counts), bucketed by the step of a cold load
each thread is in: the compatibility gate's facts, the artifact download, `load_model`, Ray's
multiplexer, the HTTP path.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import subprocess
import tempfile
import threading
from pathlib import Path

from regserve_operator.sandbox.models import log_sklearn_classifier

from bench.common import (
    PYTHON,
    RESULTS,
    RayCluster,
    bare_app,
    check,
    exit_cleanly_on_sigterm,
    load,
    markdown_table,
    regserve_app,
    start_mlflow,
    uptime,
)

BUCKETS = (
    ("model predict", ("sklearn/", "pyfunc/__init__.py:predict", "_predict_group")),
    ("signature/pydantic", ("pydantic", "schema.py", "convert.py", "validate_json")),
    ("pandas/numpy", ("pandas/", "numpy/")),
    ("regserve handler", ("serving_app/",)),
    ("metrics", ("metrics", "prometheus", "opentelemetry")),
    ("fastapi/starlette", ("fastapi/", "starlette/")),
    ("ray serve replica", ("ray/serve/",)),
    ("asyncio/other", ("",)),
)


def replica_pid(app: str) -> int:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if f"ServeReplica:{app}:" in line:
            return int(line.split()[0])
    raise LookupError(f"no replica process for {app}")


COLD_BUCKETS = (
    # py-spy frames read `function (path:line)`: the path keeps same-named functions apart.
    ("gate: version facts over REST", ("fetch_facts (*serving_app/registry.py",)),
    ("artifact download (prefetch)", ("_download (",)),
    ("load_model", ("load (*serving_app/registry.py",)),
    ("ray multiplexer", ("ray/serve/multiplex.py",)),
    # Idle threads (event loops waiting) are sampled too: everything else is not attributable.
    ("other", ("",)),
)


def profile(pid: int, seconds: float, out: Path, *, idle: bool = False) -> collections.Counter[str]:
    py_spy = str(Path(PYTHON).parent / "py-spy")
    command = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--format", "raw"]
    subprocess.run([*command, *(["--idle"] if idle else []), "-o", str(out)], capture_output=True, check=True)
    subprocess.run(
        [py_spy, "record", "-p", str(pid), "-d", "1", "-o", str(out.with_suffix(".svg"))],
        capture_output=True,
        check=False,
    )
    stacks: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks[stack] += int(count)
    return stacks


def bucket_of(stack: str, buckets: tuple[tuple[str, tuple[str, ...]], ...] = BUCKETS) -> str:
    frames = stack.split(";")
    for name, needles in buckets:  # the first bucket any frame falls in, by priority
        if any(n and fnmatch.fnmatchcase(f, f"*{n}*") for f in frames for n in needles):
            return name
    return buckets[-1][0]


def profile_cold(args: argparse.Namespace) -> None:
    import time

    import httpx

    print(f"# cold-load profile; load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-profile-cold-"))
    server = start_mlflow(workdir / "mlflow")
    cluster: RayCluster | None = None
    try:
        versions, row = [], []
        for seed in range(args.cold + 1):
            version, samples, _ = log_sklearn_classifier(server.url, "bench_cold", seed=seed)
            versions.append(version)
            row = [float(x) for x in samples[0]]
        cluster = RayCluster(args.ingress, workdir).start()
        cluster.deploy([regserve_app("prof-cold", "bench_cold", versions[0], server.url)])
        url = f"{cluster.serve_url}/prof-cold/serve"
        check(url, row)
        took: list[float] = []

        def cold_requests() -> None:
            time.sleep(1.0)  # py-spy attaches first
            for version in versions[1:]:
                started = time.perf_counter()
                check(url, row, {"serve-multiplexed-model-id": version})
                took.append((time.perf_counter() - started) * 1000)
            httpx.get(f"{cluster.serve_url}/prof-cold/healthz")  # type: ignore[union-attr]

        driver = threading.Thread(target=cold_requests)
        driver.start()
        seconds = 2 + args.cold * 1.0
        stacks = profile(replica_pid("prof-cold"), seconds, RESULTS / "profile-cold.txt", idle=True)
        driver.join()
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    buckets: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        name = bucket_of(stack, COLD_BUCKETS)
        if name != "other":
            buckets[name] += count
    rows = [
        [name, buckets[name], buckets[name] / 200 * 1000 / max(1, len(took))] for name, _ in COLD_BUCKETS[:-1]
    ]
    text = markdown_table(
        ["step (samples at 200 Hz)", "samples", "thread-ms per cold request in that step"], rows
    )
    print(f"\ncold requests (ms): {[round(t) for t in took]}\n\n{text}")
    (RESULTS / "profile-cold.md").write_text(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ingress", default="haproxy")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--cold", type=int, default=0, help="profile N cold pinned requests instead")
    parser.add_argument("--concurrency", type=int, default=1, help="closed-loop clients during sampling")
    parser.add_argument("--batch", type=int, default=1, help="max_batch_size of both deployments")
    args = parser.parse_args()
    if args.cold:
        exit_cleanly_on_sigterm()
        profile_cold(args)
        return
    print(f"# replica profile; load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-profile-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    cluster: RayCluster | None = None
    summary: dict[str, dict[str, float]] = {}
    tops: dict[str, list[tuple[str, int]]] = {}
    try:
        version, samples, _ = log_sklearn_classifier(server.url, "bench_profile")
        row = [float(x) for x in samples[0]]
        cluster = RayCluster(args.ingress, workdir).start()
        cluster.deploy(
            [
                regserve_app("prof-rs", "bench_profile", version, server.url, batch=args.batch),
                bare_app("prof-bare", f"models:/bench_profile/{version}", batch=args.batch),
            ]
        )
        # label → (application whose replica is sampled, url, body)
        targets = {
            "prof-rs /serve": ("prof-rs", f"{cluster.serve_url}/prof-rs/serve", row),
            "prof-rs /invocations": (
                "prof-rs",
                f"{cluster.serve_url}/prof-rs/invocations",
                {"inputs": [row]},
            ),
            "prof-bare": ("prof-bare", f"{cluster.serve_url}/prof-bare", {"inputs": [row]}),
        }
        for label, (app, url, body) in targets.items():
            check(url, body)
            result: dict[str, object] = {}
            driver = threading.Thread(
                target=lambda u=url, b=body, r=result: r.update(
                    load(u, b, concurrency=args.concurrency, duration_s=args.seconds + 2, warmup_s=0.5)
                )
            )
            driver.start()
            stem = label.replace(" /", "-")
            stacks = profile(replica_pid(app), args.seconds, RESULTS / f"profile-{stem}.txt")
            driver.join()
            total = sum(stacks.values()) or 1
            buckets: collections.Counter[str] = collections.Counter()
            frames: collections.Counter[str] = collections.Counter()
            for stack, count in stacks.items():
                buckets[bucket_of(stack)] += count
                for frame in set(stack.split(";")):
                    frames[frame] += count
            summary[label] = {name: buckets[name] / total * 100 for name, _ in BUCKETS}
            summary[label]["samples"] = total
            summary[label]["rps"] = float(result.get("rps", 0))  # type: ignore[arg-type]
            summary[label]["p50_ms"] = float(result.get("p50_ms", 0))  # type: ignore[arg-type]
            tops[label] = frames.most_common(40)
            print(
                f"{label}: {result.get('rps', 0):.0f} req/s p50 {result.get('p50_ms', 0):.2f} ms", flush=True
            )
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    names = [name for name, _ in BUCKETS]
    rows = [
        [label, values["rps"], values["p50_ms"], int(values["samples"]), *[values[n] for n in names]]
        for label, values in summary.items()
    ]
    text = markdown_table(["target", "req/s", "p50 ms", "samples", *[f"% {n}" for n in names]], rows)
    print("\n" + text)
    for label, top in tops.items():
        print(f"\ntop inclusive frames, {label}:")
        for frame, count in top:
            print(f"  {count:6}  {frame[:150]}")
    (RESULTS / "profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
