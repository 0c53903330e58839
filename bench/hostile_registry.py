"""A hostile tracking server beside healthy ones: promotion latency of the healthy resources with and
without it, in the same run.

    .venv/bin/python -m bench.hostile_registry [--resources 50] [--models 5] [--rounds 4]

A real `mlflow server` holds M models (versions 1 and 2 each, `champion` on 1) served by N resources.
The operator's loop runs as `regserve run` runs it (`tests/reliability/operator_loop.py`:
`operator_state.State.run_pass` with its pass deadline, `operator_state.handle`, `reconcile_pass`, the
real `Registry`),
with an in-memory API server and a target that makes each RayService Ready at once. Each round times
two promotions, alternately: one with only the healthy resources present, one while a resource per
hostile mode (`tests/reliability/hostile_mlflow.py`: trickled answers and headers, endless pages,
1 GiB bodies, a login page, a redirect, malformed JSON) has just joined, its polls hanging or failing.
A promotion moves a model's `champion` and does what a webhook delivery does (`State.model_changed`);
its time is from the alias call's return to the patch of the model's last resource. The hostile
resources are removed between rounds (as a deletion does); each round's have tracking URIs of their
own (a path per round), so none is still in its registry back-off. The process's RSS is sampled every
10 ms (the process also runs the stand-in and has imported mlflow to register the models).
Writes bench/results/hostile_registry.{json,md,png}.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    exit_cleanly_on_sigterm,
    markdown_table,
    median,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)

REGISTRY_DEADLINE_S = 10.0  # the operator's is 30 s; a loaded machine's MLflow needs some
PASS_DEADLINE_S = 1.0


def run(resources: int, m: int, rounds: int) -> dict[str, Any]:
    from regserve_operator import operator_state

    from tests.reliability.hostile_mlflow import MODES, HostileMlflow
    from tests.reliability.operator_loop import (
        NAMESPACE,
        OperatorLoop,
        PeakRss,
        register_models,
        rss_kib,
        wait_until,
    )

    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-hostile-"))
    server = start_mlflow(workdir / "mlflow")
    try:
        models = [f"bench_hostile_{i}" for i in range(m)]
        register_models(server, models)
        healthy = {f"healthy-{i}": models[i % m] for i in range(resources)}
        current = dict.fromkeys(models, "1")
        promotions: list[dict[str, Any]] = []
        with (
            HostileMlflow(trickle_interval_s=0.5) as hostile,
            OperatorLoop(registry_deadline_s=REGISTRY_DEADLINE_S, pass_deadline_s=PASS_DEADLINE_S) as loop,
        ):
            started = time.perf_counter()
            for name, model in healthy.items():
                loop.add(name, model, server.url)
            wait_until(
                lambda: all(loop.settled(n, "1") for n in healthy),
                600,
                "every resource serving",
                lambda: loop.describe(list(healthy)),
            )
            setup_s = time.perf_counter() - started
            idle_rss = rss_kib() / 1024
            statuses: dict[str, str] = {}
            k = 0
            for r in range(rounds):
                for case in ("alone", "beside hostile") if r % 2 == 0 else ("beside hostile", "alone"):
                    model = models[k % m]
                    k += 1
                    names = [n for n, mm in healthy.items() if mm == model]
                    to = "2" if current[model] == "1" else "1"
                    with PeakRss() as rss:
                        if case != "alone":
                            for mode in MODES:
                                loop.add(f"hostile-{mode}-{r}", "hostile", f"{hostile.url(mode)}/round-{r}")
                            asked = {mode: hostile.requests[mode] for mode in MODES}
                            wait_until(
                                functools.partial(_asked_again, hostile, asked),
                                60,
                                "every hostile mode asked",
                            )
                        passes_before = len(loop.pass_seconds)
                        seconds = loop.promote(server.url, model, to, names, timeout=120)
                        passes = loop.pass_seconds[passes_before:]
                    current[model] = to
                    wait_until(functools.partial(_settled, loop, names, to), 120, "settled")
                    if case != "alone":
                        keys = [(NAMESPACE, f"hostile-{mode}-{r}") for mode in MODES]
                        wait_until(
                            functools.partial(_all_unreachable, loop, keys),
                            60,
                            "every hostile status",
                        )
                        for mode, key in zip(MODES, keys, strict=True):
                            statuses.setdefault(mode, _unreachable(loop, key[1]))
                            operator_state.forget(loop.state, key, {})
                        wait_until(
                            functools.partial(_none_in_flight, loop, keys),
                            60,
                            "the hostile resources' work over",
                        )
                    promotions.append(
                        {
                            "round": r,
                            "case": case,
                            "model": model,
                            "resources": len(names),
                            "seconds": seconds,
                            "peak_rss_mb": rss.peak / 1024,
                            "passes": len(passes),
                            "max_pass_s": max(passes, default=float("nan")),
                        }
                    )
                    print(
                        f"round {r} {case:15} {model}: {seconds:.3f} s, peak RSS {rss.peak / 1024:.0f} MB",
                        flush=True,
                    )
    finally:
        server.stop()
    return {
        "resources": resources,
        "models": m,
        "setup_s": setup_s,
        "idle_rss_mb": idle_rss,
        "promotions": promotions,
        "statuses": statuses,
        "huge_bytes_sent": hostile.huge_bytes_sent,
        "redirected_requests": hostile.other_requests,
    }


def _asked_again(hostile: Any, asked: dict[str, int]) -> bool:
    return all(hostile.requests[mode] > count for mode, count in asked.items())


def _settled(loop: Any, names: list[str], version: str) -> bool:
    return all(loop.settled(name, version) for name in names)


def _all_unreachable(loop: Any, keys: list[tuple[str, str]]) -> bool:
    return all(_unreachable(loop, name) for _, name in keys)


def _none_in_flight(loop: Any, keys: list[tuple[str, str]]) -> bool:
    return not any(key in loop.state.in_flight for key in keys)


def _unreachable(loop: Any, name: str) -> str:
    """The resource's RegistryReachable=False message; empty while it has none."""
    reachable = loop.condition(name, "RegistryReachable") or {}
    return str(reachable.get("message", "")) if reachable.get("status") == "False" else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--resources", type=int, default=50)
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    before = uptime()
    print(f"# hostile registry benchmark, {stamp()}\n# load before: {before}", flush=True)
    exit_cleanly_on_sigterm()
    result = run(args.resources, args.models, args.rounds)
    report(result, before)


def report(result: dict[str, Any], before: str) -> None:
    promotions = result["promotions"]
    rows = [
        [
            p["round"],
            p["case"],
            p["model"],
            p["resources"],
            p["seconds"],
            p["passes"],
            p["max_pass_s"],
            p["peak_rss_mb"],
        ]
        for p in promotions
    ]
    headers = [
        "round", "case", "model", "its resources", "alias moved → last patch s", "passes meanwhile",
        "longest pass s", "peak RSS MB",
    ]  # fmt: skip
    alone = [p["seconds"] for p in promotions if p["case"] == "alone"]
    beside = [p["seconds"] for p in promotions if p["case"] != "alone"]
    summary = markdown_table(
        ["case", "promotions", "median s", "max s", "ratio of medians", "highest peak RSS MB"],
        [
            [
                "alone",
                len(alone),
                median(alone),
                max(alone),
                1.0,
                max(p["peak_rss_mb"] for p in promotions if p["case"] == "alone"),
            ],
            [
                "beside the hostile registry",
                len(beside),
                median(beside),
                max(beside),
                median(beside) / median(alone),
                max(p["peak_rss_mb"] for p in promotions if p["case"] != "alone"),
            ],
        ],
    )
    header = (
        f"hostile registry benchmark {stamp()}: {result['resources']} resources over {result['models']} "
        f"models of a real mlflow server, first reconcile {result['setup_s']:.0f} s, idle RSS "
        f"{result['idle_rss_mb']:.0f} MB; 1 GiB answers: {result['huge_bytes_sent'] / 2**20:.0f} MiB sent "
        f"before the client cut them; requests reaching the redirect's target: "
        f"{result['redirected_requests']}; load before: {before}; after: {uptime()}\n"
    )
    reasons = markdown_table(
        ["hostile mode", "RegistryReachable=False message"], sorted(result["statuses"].items())
    )
    text = summary + "\n\n" + markdown_table(headers, rows) + "\n\n" + reasons
    print("\n" + header + "\n" + text)
    save_json("hostile_registry", result)
    (RESULTS / "hostile_registry.md").write_text(header + "\n" + text + "\n")
    plot(promotions)


def plot(promotions: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for case, marker in (("alone", "o"), ("beside hostile", "s")):
        picked = [p for p in promotions if p["case"] == case]
        a.plot([p["round"] for p in picked], [p["seconds"] for p in picked], marker=marker, label=case)
        b.plot([p["round"] for p in picked], [p["peak_rss_mb"] for p in picked], marker=marker, label=case)
    a.set_xlabel("round")
    a.set_ylabel("alias moved → last RayService patched, s")
    a.set_ylim(bottom=0)
    a.legend()
    b.set_xlabel("round")
    b.set_ylabel("process peak RSS, MB")
    b.set_ylim(bottom=0)
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "hostile_registry.png", dpi=90)


if __name__ == "__main__":
    main()
