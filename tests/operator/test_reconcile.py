"""Rollout behaviour of `reconcile`, scenario by scenario, with in-memory ports."""

from __future__ import annotations

from typing import Any

import pytest
from regserve_operator import conditions as c
from regserve_operator.builders import serving_version_of, user_config_of
from regserve_operator.decide import next_delay
from regserve_operator.ports import TargetConflict
from regserve_operator.probe import AppReport, SwitchFailure

from .fakes import World, signature
from .helpers import OWNER, make_spec

SIG = signature(prompt="string")


def _world(**spec: Any) -> World:
    world = World(make_spec(**spec))
    world.server.add("1", SIG)
    world.server.add("2", SIG)
    world.server.add("3", signature(text="string"))  # incompatible: prompt removed, text required
    world.server.add("4", SIG, size=3 * 1024**3)  # compatible but much bigger
    world.server.aliases["champion"] = "1"
    return world


def _cond(world: World, type_: str) -> Any:
    return c.get_condition(world.status.conditions, type_)


def _serving(world: World) -> str | None:
    return serving_version_of(world.rayservice())


def _running(world: World) -> World:
    """Create, then let the first version become RUNNING."""
    world.step()
    world.target.set_app_status("RUNNING")
    world.step(6)
    assert world.status.last_good_version == "1"
    world.events.clear()
    world.target.applied.clear()
    return world


def test_create() -> None:
    world = _world()
    out = world.step()
    assert out.plan is not None and out.plan.action == "create"
    assert _serving(world) == "1"
    assert world.status.resolved_version == "1" and world.status.serving_version == "1"
    assert world.status.rollout_version == "1" and out.in_flight
    assert world.events == [("Normal", "RolloutStarted"), ("Normal", "Created")]
    assert world.status.url == "http://translator-serve-svc.ml.svc:8000/translator"
    assert world.status.selector == "@champion" and world.status.ray_service_name == "translator"
    assert _cond(world, c.READY).status == "False" and _cond(world, c.ROLLOUT_IN_PROGRESS).status == "True"
    assert world.target.secret_reads == [("ml", "mlflow-auth")]


def test_first_version_confirmed_when_running() -> None:
    world = _world()
    world.step()
    world.target.set_app_status("RUNNING")
    world.step(1)  # within settle time: not yet
    assert world.status.last_good_version is None
    world.step(6)
    assert world.status.last_good_version == "1" and world.status.rollout_version is None
    assert ("Normal", "RolloutSucceeded") in world.events
    assert _cond(world, c.READY).status == "True" and _cond(world, c.ROLLOUT_IN_PROGRESS).status == "False"


def test_steady_state_writes_nothing() -> None:
    world = _running(_world())
    for _ in range(3):
        out = world.step()
        assert out.plan is not None and out.plan.action == "none"
    assert world.events == [] and world.target.applied == []


def test_compatible_promotion_patches_serve_config_only() -> None:
    world = _running(_world())
    cluster_before = world.rayservice()["spec"]["rayClusterConfig"]
    world.server.aliases["champion"] = "2"
    out = world.step()
    assert out.plan is not None and out.plan.action == "patch_serve_config"
    assert _serving(world) == "2"
    assert world.rayservice()["spec"]["rayClusterConfig"] == cluster_before
    # No app probe in this world: the default smoke test is skipped with a warning.
    assert world.events == [("Warning", "RolloutUnjudged"), ("Normal", "RolloutStarted")]
    world.target.set_app_status("RUNNING")
    world.step(6)
    assert world.status.last_good_version == "2"
    assert [h.outcome for h in world.status.history or []][-2:] == ["Serving", "Superseded"]


def test_bigger_version_grows_the_cluster() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "4"
    out = world.step()
    assert out.plan is not None and out.plan.action == "patch_cluster"
    assert ("Normal", "ClusterUpdated") in world.events


def test_incompatible_version_is_held_once() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "3"
    out = world.step()
    assert out.results == ["held"]
    # One write: the same default, and the held version refused to clients' pins (serving.pinning).
    assert [plan.action for plan in world.target.applied] == ["patch_serve_config"] and _serving(world) == "1"
    assert user_config_of(world.rayservice())["pinning"] == {"mode": "Compatible", "refused": ["3"]}
    cond = _cond(world, c.SIGNATURE_COMPATIBLE)
    assert cond.status == "False" and "inputs.prompt" in cond.message
    assert world.status.rejected is not None and world.status.rejected.version == "3"
    assert world.status.rejected.differences
    assert world.events == [("Warning", "SignatureIncompatible")]
    for _ in range(3):
        world.step()
    assert world.events == [("Warning", "SignatureIncompatible")]
    assert len(world.target.applied) == 1
    assert world.status.serving_version == "1" and world.status.resolved_version == "3"


def test_selector_moving_on_clears_the_hold() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "3"
    world.step()
    world.server.aliases["champion"] = "2"
    world.step()
    assert world.status.rejected is None and _serving(world) == "2"
    assert _cond(world, c.SIGNATURE_COMPATIBLE).status == "True"


def test_deliberate_breaking_rollout() -> None:
    world = _running(_world(rollout={"allowIncompatibleVersion": "3"}))
    world.server.aliases["champion"] = "3"
    world.step()
    assert _serving(world) == "3"
    assert _cond(world, c.SIGNATURE_COMPATIBLE).reason == "AllowedIncompatible"


def test_failed_rollout_rolls_back_without_retry() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "2"
    world.step()
    world.target.set_app_status("DEPLOY_FAILED", "load error")
    out = world.step(6)
    assert out.results == ["rolled_back"]
    assert _serving(world) == "1"
    assert world.status.rejected is not None and world.status.rejected.reason == "RolledBack"
    assert "load error" in world.status.rejected.message
    assert world.events == [
        ("Warning", "RolloutUnjudged"),
        ("Normal", "RolloutStarted"),
        ("Warning", "RolledBack"),
    ]
    world.target.set_app_status("RUNNING")
    world.target.applied.clear()
    for _ in range(3):
        world.step()
    assert world.target.applied == [] and _serving(world) == "1"
    assert world.events == [
        ("Warning", "RolloutUnjudged"),
        ("Normal", "RolloutStarted"),
        ("Warning", "RolledBack"),
    ]


def test_rollout_deadline() -> None:
    world = _running(_world(rollout={"deadlineSeconds": 60}))
    world.server.aliases["champion"] = "2"
    world.step()
    world.target.set_app_status("DEPLOYING")
    world.step(30)
    assert world.status.rollout_version == "2"
    world.step(31)
    assert _serving(world) == "1" and "within 60s" in (
        world.status.rejected.message if world.status.rejected else ""
    )


def test_registry_down_keeps_serving() -> None:
    world = _running(_world())
    world.server.down = True
    out = world.step()
    assert out.retry and world.target.applied == []
    assert _cond(world, c.REGISTRY_REACHABLE).status == "False"
    assert _cond(world, c.READY).status == "True"  # still serving
    for _ in range(3):
        world.step(400)
    assert world.events == [("Warning", "RegistryUnreachable")]
    world.server.down = False
    world.step(400)
    assert _cond(world, c.REGISTRY_REACHABLE).status == "True"
    assert world.events[-1] == ("Normal", "RegistryReachable")


def test_missing_alias_creates_nothing() -> None:
    world = _world(model={"name": "translation_model", "alias": "nope"})
    out = world.step()
    assert out.retry and world.target.objects == {}
    assert _cond(world, c.SELECTOR_RESOLVED).status == "False"
    world.step()
    assert world.events == [("Warning", "SelectorUnresolved")]


def test_missing_secret() -> None:
    world = _world()
    world.target.secrets.clear()
    out = world.step()
    assert out.retry and world.target.objects == {}
    assert _cond(world, c.READY).reason == "CredentialsUnavailable"


def test_paused_stops_rollouts() -> None:
    world = _running(_world())
    world.spec = make_spec(paused=True)
    world.server.aliases["champion"] = "2"
    world.step()
    assert world.target.applied == [] and world.status.resolved_version == "2" and _serving(world) == "1"
    paused_before = _world(paused=True)
    paused_before.step()
    assert paused_before.target.objects == {}
    assert _cond(paused_before, c.READY).reason == "Paused"


def test_foreign_rayservice_is_not_touched() -> None:
    world = _world()
    world.step()
    obj = world.target.objects[("ml", "translator")]
    obj["metadata"]["ownerReferences"] = [{"uid": "someone-else"}]
    world.target.applied.clear()
    world.server.aliases["champion"] = "2"
    out = world.step()
    assert out.plan is not None and out.plan.action == "conflict"
    assert world.target.applied == [] and _cond(world, c.READY).reason == "Conflict"


def test_requirements_mismatch_is_a_warning_condition() -> None:
    world = _world()
    world.deps.image_pins = {"mlflow": "3.16.0"}
    world.step()
    cond = _cond(world, c.REQUIREMENTS_MATCH)
    assert cond.status == "False" and "mlflow==3.17.2" in cond.message
    assert ("Warning", "RequirementsMismatch") in world.events
    assert _serving(world) == "1"  # a warning, not a gate


def test_credentials_never_reach_status_or_events() -> None:
    world = _world()
    world.step()
    world.server.down = True
    world.step()
    text = world.status.model_dump_json() + repr(world.events)
    assert "tok" not in text.replace("token", "")


def test_next_delay() -> None:
    world = _world()
    out = world.step()
    assert next_delay(out, 30, 0) == 2.0
    out.in_flight, out.retry = False, False
    assert next_delay(out, 30, 0) == 30
    out.retry = True
    assert [next_delay(out, 30, n) for n in (1, 2, 3, 20)] == [2.0, 4.0, 8.0, 300.0]


def test_selector_moving_during_a_rollout_supersedes_it() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "2"
    world.step()
    world.target.set_app_status("DEPLOYING")
    world.server.aliases["champion"] = "3"  # incompatible with the last good version 1
    world.step()
    assert world.status.rejected is not None and world.status.rejected.version == "3"
    assert _serving(world) == "1"  # back to the last good version
    assert world.status.rollout_version is None
    world.server.aliases["champion"] = "2"
    world.step()
    assert _serving(world) == "2" and world.status.rollout_version == "2"


def test_missing_pinned_version_reports_once() -> None:
    world = _world(model={"name": "translation_model", "version": "9"})
    for _ in range(3):
        out = world.step()
        assert out.retry
    assert world.events == [("Warning", "SelectorUnresolved")]
    assert world.target.objects == {}


def test_registry_down_during_facts_posts_one_event() -> None:
    world = _world()
    world.step()  # snapshot cached; facts of 1 cached
    world.server.aliases["champion"] = "2"
    world.server.facts.pop("2")
    world.server.down = True
    world.step(1)  # snapshot still fresh: resolves to 1, nothing to do
    world.events.clear()
    world.step(31)
    assert world.events.count(("Warning", "RegistryUnreachable")) == 1


def test_stale_failure_status_right_after_the_patch_is_not_judged() -> None:
    world = _running(_world())
    world.target.set_app_status("UNHEALTHY")  # the old config was unhealthy before the promotion
    world.server.aliases["champion"] = "2"
    world.step()
    world.step(1)  # KubeRay has not reported on the new config yet
    assert world.status.rollout_version == "2" and world.status.rejected is None
    world.target.set_app_status("RUNNING")
    world.step(6)
    assert world.status.last_good_version == "2"


def test_kuberay_upgrade_is_mirrored_as_rollout_in_progress() -> None:
    world = _running(_world())
    obj = world.target.objects[("ml", "translator")]
    obj["status"]["conditions"].append({"type": "UpgradeInProgress", "status": "True"})
    world.step()
    cond = _cond(world, c.ROLLOUT_IN_PROGRESS)
    assert (cond.status, cond.reason) == ("True", "NewCluster")
    assert world.target.applied == []


def _transient_failure(world: World, version: str) -> Any:
    """Ray runs the app, which reports its switch to `version` failed: the registry was unavailable."""
    world.target.set_app_status("RUNNING")
    failed_at = world.now.timestamp() + 1
    world.deps.probe = lambda url: AppReport("1", SwitchFailure(version, "registry_unavailable", failed_at))
    outcome = world.step(6)
    world.deps.probe = None
    return outcome


def test_rollout_failed_by_registry_outage_is_retried_with_backoff() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "2"
    world.step()
    out = _transient_failure(world, "2")
    assert out.results == ["rolled_back"] and _serving(world) == "1"
    assert world.status.rejected is not None and "retried in 5s" in world.status.rejected.message
    world.target.set_app_status("RUNNING")
    world.target.applied.clear()
    out = world.step(2)
    assert world.target.applied == [] and _serving(world) == "1"  # backoff not over
    assert out.requeue_after_s == 3.0 and next_delay(out, 300, 0, 1.0) == 3.0  # not at the next poll
    world.step(4)
    assert _serving(world) == "2" and world.status.rollout_version == "2" and world.status.rejected is None
    out = _transient_failure(world, "2")  # still unreachable: the next wait doubles
    assert "retried in 10s" in (world.status.rejected.message if world.status.rejected else "")
    world.target.set_app_status("RUNNING")
    world.step(6)
    assert _serving(world) == "1"
    world.step(5)
    assert _serving(world) == "2"
    world.step(6)  # the registry is back: the load succeeds
    assert world.status.last_good_version == "2" and world.status.rejected is None


def test_unreadable_mlmodel_is_held() -> None:
    world = _running(_world())

    def garbage(uri: str, creds: Any, name: str, version: str) -> Any:
        if version == "2":
            raise ValueError("while parsing a flow mapping")
        return world.server.fetch_facts(uri, creds, name, version)

    world.registry._fetch_facts = garbage
    world.server.aliases["champion"] = "2"
    out = world.step()
    assert out.results == ["held"] and not out.retry and _serving(world) == "1"
    assert user_config_of(world.rayservice())["pinning"]["refused"] == ["2"]  # the one write
    assert world.status.rejected is not None and world.status.rejected.version == "2"
    cond = _cond(world, c.SIGNATURE_COMPATIBLE)
    assert cond.status == "False" and cond.reason == "Unreadable" and "MLmodel" in cond.message
    assert world.events == [("Warning", "VersionUnreadable")]
    for _ in range(3):
        world.step()
    assert len(world.target.applied) == 1 and world.events == [("Warning", "VersionUnreadable")]
    world.server.aliases["champion"] = "4"
    world.step()
    assert _serving(world) == "4" and world.status.rejected is None


def test_write_conflict_is_looked_at_again_next_tick_not_backed_off() -> None:
    world = _running(_world())
    world.server.aliases["champion"] = "2"
    real_apply = world.target.apply
    conflicts = []

    def apply_once_conflicting(plan: Any) -> None:
        if not conflicts:
            conflicts.append(plan)
            raise TargetConflict("resourceVersion moved")
        real_apply(plan)

    world.target.apply = apply_once_conflicting  # type: ignore[method-assign]
    out = world.step()
    assert conflicts and not out.retry and out.in_flight
    assert next_delay(out, 30, failures=3) == 2.0  # the tick, not the error backoff
    world.step(2)
    assert serving_version_of(world.target.get(OWNER.namespace, OWNER.name)) == "2"


@pytest.mark.parametrize(
    "answers, outcome",
    [
        ("2", "succeeded"),  # the app confirms the new default
        (None, "succeeded"),  # the app cannot be asked: KubeRay's RUNNING decides
        ("1", "rolled_back"),  # RUNNING, but the old default still answers: the switch failed
    ],
)
def test_running_rollout_is_confirmed_by_the_app(answers: str | None, outcome: str) -> None:
    asked: list[str] = []

    def probe(url: str) -> AppReport | None:
        asked.append(url)
        return None if answers is None else AppReport(answers)

    world = World(make_spec(rollout={"deadlineSeconds": 60}), probe=probe)
    world.server.add("1", SIG)
    world.server.add("2", SIG)
    world.server.aliases["champion"] = "1"
    world.step()
    world.target.set_app_status("RUNNING")
    world.step(6)
    world.server.aliases["champion"] = "2"
    world.step()
    world.target.set_app_status("RUNNING")
    results = [*world.step(6).results, *world.step(30).results, *world.step(31).results]
    assert outcome in results
    assert asked and all(url == world.status.url for url in asked)
    if outcome == "rolled_back":
        assert _serving(world) == "1"
        assert world.status.rejected is not None and world.status.rejected.version == "2"
        assert "still answers with version 1" in world.status.rejected.message
    else:
        assert world.status.last_good_version == "2"


def test_probe_of_an_unreachable_app_is_unknown() -> None:
    from regserve_operator.probe import probe_app
    from regserve_operator.sandbox.processes import free_port

    assert probe_app(f"http://127.0.0.1:{free_port()}/nothing") is None


def test_promote_hold_promote_again_gates_against_what_serves() -> None:
    """2 answers before it settles; 3 (incompatible) is held against 2; then 4 rolls out over 2, and a
    failure of 4 restores 2, the version that answered — never the older 1."""
    world = _running(_world())
    world.deps.settle_seconds = 60
    world.deps.probe = lambda url: AppReport(_serving(world))
    world.server.aliases["champion"] = "2"
    world.step()
    world.target.set_app_status("RUNNING")
    world.step(2)
    assert world.status.rollout_version == "2"  # not settled yet
    world.server.aliases["champion"] = "3"
    world.registry.model_changed("translation_model")  # as a webhook delivery does
    world.step(2)
    assert world.status.last_good_version == "2" and _serving(world) == "2"
    assert world.status.rejected is not None and world.status.rejected.version == "3"
    world.server.aliases["champion"] = "4"
    world.registry.model_changed("translation_model")
    world.step(2)
    assert _serving(world) == "4" and world.status.rejected is None
    world.target.set_app_status("DEPLOY_FAILED", "boom")
    world.step(61)
    assert _serving(world) == "2" and world.status.rejected is not None
    assert (world.status.rejected.version, world.status.rejected.cause) == ("4", "DeployFailed")
