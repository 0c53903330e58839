"""Where a replica's time goes at c=1: py-spy samples of regserve's and the bare deployment's replicas.

    .venv/bin/python -m bench.profile_replica [--ingress haproxy] [--seconds 15]

Same sklearn model, same ingress mode, one at a time under c=1 load from bench/loadgen.py while
`py-spy record` samples the replica process (idle threads excluded). Prints, per replica, the share of
samples under each of a few buckets (the `predict` itself, pandas/numpy conversion, regserve's
request handling, FastAPI/Starlette, Ray Serve's replica machinery) and the top frames; writes the
collapsed stacks and a flame graph SVG to bench/results/.
"""

from __future__ import annotations

import argparse
import collections
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


def profile(pid: int, seconds: float, out: Path) -> collections.Counter[str]:
    py_spy = str(Path(PYTHON).parent / "py-spy")
    subprocess.run(
        [
            py_spy,
            "record",
            "-p",
            str(pid),
            "-d",
            str(int(seconds)),
            "-r",
            "200",
            "--format",
            "raw",
            "-o",
            str(out),
        ],
        capture_output=True,
        check=True,
    )
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


def bucket_of(stack: str) -> str:
    frames = stack.split(";")
    for name, needles in BUCKETS:  # the first bucket any frame falls in, by priority
        if any(n and n in f for f in frames for n in needles):
            return name
    return BUCKETS[-1][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ingress", default="haproxy")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
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
                regserve_app("prof-rs", "bench_profile", version, server.url),
                bare_app("prof-bare", f"models:/bench_profile/{version}"),
            ]
        )
        targets = {
            "prof-rs": (f"{cluster.serve_url}/prof-rs/serve", row),
            "prof-bare": (f"{cluster.serve_url}/prof-bare", {"inputs": [row]}),
        }
        for app, (url, body) in targets.items():
            check(url, body)
            result: dict[str, object] = {}
            driver = threading.Thread(
                target=lambda u=url, b=body, r=result: r.update(
                    load(u, b, concurrency=1, duration_s=args.seconds + 2, warmup_s=0.5)
                )
            )
            driver.start()
            stacks = profile(replica_pid(app), args.seconds, RESULTS / f"profile-{app}.txt")
            driver.join()
            total = sum(stacks.values()) or 1
            buckets: collections.Counter[str] = collections.Counter()
            frames: collections.Counter[str] = collections.Counter()
            for stack, count in stacks.items():
                buckets[bucket_of(stack)] += count
                for frame in set(stack.split(";")):
                    frames[frame] += count
            summary[app] = {name: buckets[name] / total * 100 for name, _ in BUCKETS}
            summary[app]["samples"] = total
            tops[app] = frames.most_common(25)
            print(f"{app}: {result.get('rps', 0):.0f} req/s p50 {result.get('p50_ms', 0):.2f} ms", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    names = [name for name, _ in BUCKETS]
    rows = [[app, int(values["samples"]), *[values[n] for n in names]] for app, values in summary.items()]
    text = markdown_table(["replica", "samples", *[f"% {n}" for n in names]], rows)
    print("\n" + text)
    for app, top in tops.items():
        print(f"\ntop inclusive frames, {app}:")
        for frame, count in top:
            print(f"  {count:6}  {frame[:150]}")
    (RESULTS / "profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
