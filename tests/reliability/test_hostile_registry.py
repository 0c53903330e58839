"""A hostile tracking server harms only its own resources.

The operator's loop (`operator_loop.py`: `operator_state.State.run_pass` with the real Registry) serves 50
resources over 5 models of the session's real `mlflow server`. A promotion is timed with nothing else
there, then again once one resource per hostile mode (`hostile_mlflow.py`: trickled answers and
headers, endless pages, 1 GiB bodies, a login page, a redirect to another host, malformed JSON) has
joined and its first poll hangs or fails. The promotion is as fast (a ratio in the same run), the
process's memory stays bounded while 1 GiB answers stream in, and each hostile resource's status
says what is wrong with its registry.
"""

from __future__ import annotations

import time
import uuid

import pytest
from regserve_operator.registry import MIN_REFETCH_S
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.reliability.hostile_mlflow import MODES, HostileMlflow
from tests.reliability.operator_loop import OperatorLoop, PeakRss, register_models, wait_until

pytestmark = [pytest.mark.slow]

HEALTHY, MODELS = 50, 5
REGISTRY_DEADLINE_S = 10.0  # the operator's is 30 s; a loaded machine's MLflow needs some
MAX_PAGES = 50

# What each hostile resource's RegistryReachable=False message must say.
EXPECTED = {
    "trickle": f"no complete answer within {REGISTRY_DEADLINE_S:g} s",
    "trickle-headers": f"no complete answer within {REGISTRY_DEADLINE_S:g} s",
    "endless": f"more than {MAX_PAGES} pages",
    "huge": "answer longer than 8388608 bytes",
    "huge-declared": f"answer of {1 << 30} bytes",
    "login": "search answered no JSON",
    "redirect": "HTTP 302 (a redirect: not followed)",
    "malformed": "no MLflow search page",
    "bad-version": "a version is not a number",
}


def test_a_hostile_registry_harms_only_its_own_resources(mlflow_server: MlflowServer) -> None:
    run = uuid.uuid4().hex[:6]
    models = [f"hostile_test_{run}_{i}" for i in range(MODELS)]
    register_models(mlflow_server, models)
    healthy = {f"healthy-{i}": models[i % MODELS] for i in range(HEALTHY)}

    def names_of(model: str) -> list[str]:
        return [name for name, m in healthy.items() if m == model]

    with (
        HostileMlflow(trickle_interval_s=0.5) as hostile,
        OperatorLoop(registry_deadline_s=REGISTRY_DEADLINE_S, max_pages=MAX_PAGES) as loop,
    ):
        for name, model in healthy.items():
            loop.add(name, model, mlflow_server.url)
        wait_until(
            lambda: all(loop.settled(n, "1") for n in healthy),
            120,
            "50 resources serving v1",
            lambda: loop.describe(list(healthy)),
        )
        alone = loop.promote(mlflow_server.url, models[0], "2", names_of(models[0]), timeout=60)
        promoted_at = time.monotonic()

        with PeakRss() as rss:
            for mode in MODES:
                loop.add(f"hostile-{mode}", "hostile", hostile.url(mode))
            # Promote while the trickled polls hang and the 1 GiB answers stream.
            wait_until(lambda: all(hostile.requests[m] for m in MODES), 30, "every hostile mode asked")
            # A delivery within MIN_REFETCH_S of the search made for the one before waits that out (the
            # limit on webhook floods): the ratio compares promotions, so the two are spaced further.
            wait_until(lambda: time.monotonic() - promoted_at >= MIN_REFETCH_S, 10, "deliveries spaced")
            beside = loop.promote(mlflow_server.url, models[1], "2", names_of(models[1]), timeout=60)

            def says_what_is_wrong(mode: str) -> bool:
                reachable = loop.condition(f"hostile-{mode}", "RegistryReachable") or {}
                return reachable.get("status") == "False" and EXPECTED[mode] in reachable.get("message", "")

            wait_until(
                lambda: all(says_what_is_wrong(m) for m in MODES),
                60,
                "every hostile status",
                lambda: loop.describe([f"hostile-{m}" for m in MODES]),
            )

        for mode in MODES:
            reachable = loop.condition(f"hostile-{mode}", "RegistryReachable") or {}
            assert reachable.get("reason") == "Unreachable", (mode, reachable)
            assert loop.serving(f"hostile-{mode}") is None  # nothing deployed from a hostile answer
        # Every other resource is untouched, and the redirect led nowhere.
        assert all(loop.serving(n) == "1" for m in models[2:] for n in names_of(m))
        assert hostile.other_requests == 0
        # The 1 GiB answers were cut at the cap, not read.
        assert hostile.requests["huge"] >= 1 and hostile.huge_bytes_sent < (1 << 30)

    growth_mib = (rss.peak - rss.start) / 1024
    print(
        f"promotion of 10 resources: {alone:.3f} s alone, {beside:.3f} s beside the hostile registry "
        f"({beside / alone:.2f}x); RSS peak growth {growth_mib:.1f} MiB"
    )
    assert beside <= 2 * alone + 1.0, (alone, beside)
    assert growth_mib < 100, growth_mib
