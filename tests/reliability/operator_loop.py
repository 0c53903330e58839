"""The operator's reconcile loop, as `regserve run` runs it, without Kubernetes:
`operator_state.State.run_pass`
(the watch's copies, the scheduler, `passes.run_pass` with its deadline, `operator_state.handle` and
`reconcile_pass`) with the real `Registry`, on a thread ticking like `passes.run_forever`. Statuses go
to an in-memory API server (merge patches); RayServices to a target that makes each one Ready and
RUNNING at once and records when it was patched to which version.

Used by `test_hostile_registry.py` and `bench/hostile_registry.py`.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
from regserve_operator import operator_state
from regserve_operator.builders import BuildDefaults, serving_version_of
from regserve_operator.passes import StatusWrites
from regserve_operator.plan import Plan
from regserve_operator.ports import CredentialsUnavailable, TargetConflict
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.schedule import Key
from regserve_operator.settings import Settings
from regserve_operator.spec import manifest

log = logging.getLogger(__name__)

NAMESPACE = "tenants"
DEFAULTS = BuildDefaults(image="regserve/ray:test", ray_version="2.60.0")


class ReadyTarget:
    """The Target port: every applied RayService Ready with its application RUNNING; patches timed."""

    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.patched: list[tuple[float, str, str | None]] = []  # (perf_counter, name, default version)
        self._lock = threading.Lock()
        self._rv = 0

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            obj = self.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        return []

    def apply(self, plan: Plan) -> None:
        key = (plan.namespace, plan.name)
        with self._lock:
            if plan.action == "create":
                obj = copy.deepcopy(plan.desired)
            else:
                try:
                    obj = jsonpatch.apply_patch(self.objects[key], plan.patch)
                except jsonpatch.JsonPatchTestFailed as exc:
                    raise TargetConflict(str(exc)) from exc
            self._rv += 1
            obj["metadata"]["resourceVersion"] = str(self._rv)
            obj["status"] = {
                "conditions": [{"type": "Ready", "status": "True"}],
                "activeServiceStatus": {"applicationStatuses": {plan.name: {"status": "RUNNING"}}},
            }
            self.objects[key] = obj
            self.patched.append((time.perf_counter(), plan.name, serving_version_of(obj)))

    def read_credentials(self, namespace: str, secret_name: str) -> dict[str, str]:
        raise CredentialsUnavailable(f"secret {namespace}/{secret_name}: none here")

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        return f"http://{name}-serve-svc.{namespace}.svc:8000{route_prefix}"


class StatusStore:
    """The API server's status subresource: merge patches applied in memory."""

    def __init__(self) -> None:
        self.statuses: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def write(self, key: Key, patch: dict[str, Any]) -> None:
        with self._lock:
            status = self.statuses.setdefault(key, {})
            for field, value in patch.items():
                if value is None:
                    status.pop(field, None)
                else:
                    status[field] = value

    def get(self, key: Key) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.statuses.get(key, {}))


class OperatorLoop:
    def __init__(
        self,
        *,
        workers: int = 4,
        pass_deadline_s: float = 1.0,
        registry_deadline_s: float = 10.0,
        max_pages: int = 50,
        tick_s: float = 0.1,
    ) -> None:
        settings = Settings(
            webhook_port=0,
            metrics_port=0,
            reconcile_workers=workers,
            pass_deadline_seconds=pass_deadline_s,
            tick_seconds=tick_s,
        )
        self.registry = Registry(
            deadline_s=registry_deadline_s, poll_wait_s=pass_deadline_s, max_pages=max_pages
        )
        self.target = ReadyTarget()
        self.api = StatusStore()
        deps = Deps(registry=self.registry, target=self.target, defaults=DEFAULTS, settle_seconds=0)
        self.state = operator_state.State(
            settings, deps, post_event=lambda body, event: None, writes=StatusWrites(self.api.write)
        )
        self.pass_seconds: list[float] = []
        self._tick = tick_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="operator-loop", daemon=True)

    def __enter__(self) -> OperatorLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.state.pool.shutdown(wait=True, cancel_futures=True)
        self.registry.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.state.run_pass()
            except Exception:  # as `passes.run_forever`: the loop goes on
                log.exception("pass failed")
            self.pass_seconds.append(time.monotonic() - started)
            self._stop.wait(max(0.0, self._tick - (time.monotonic() - started)))

    def add(self, name: str, model: str, tracking_uri: str, poll_s: int = 300) -> None:
        spec = {
            "model": {"name": model, "alias": "champion"},
            "registry": {"trackingUri": tracking_uri, "pollIntervalSeconds": poll_s},
            "serving": {"routePrefix": f"/{name}"},
        }
        body = manifest(name, spec, namespace=NAMESPACE)
        # What the API server adds on create.
        body["metadata"] |= {"uid": str(uuid.uuid4()), "generation": 1}
        if self.state.watched.saw(body):
            self.state.scheduler.wake((NAMESPACE, name))

    def status(self, name: str) -> dict[str, Any]:
        return self.api.get((NAMESPACE, name))

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        conditions = self.status(name).get("conditions") or []
        return next((c for c in conditions if c.get("type") == kind), None)

    def settled(self, name: str, version: str) -> bool:
        """Serving `version`, its rollout over, nothing running for it: nothing left to do until woken.
        (The deployment-state tag is written in the same pass; a tag write the registry refused or
        timed out shows as a condition, retried at the next poll, and is no part of serving.)"""
        idle = (self.condition(name, "RolloutInProgress") or {}).get("status") == "False"
        return self.serving(name) == version and idle and (NAMESPACE, name) not in self.state.in_flight

    def describe(self, names: list[str]) -> str:
        """How many resources are where: for a timeout's message."""
        seen: Counter[str] = Counter()
        for name in names:
            rollout = (self.condition(name, "RolloutInProgress") or {}).get("status")
            reachable = self.condition(name, "RegistryReachable") or {}
            tagged = sorted(self.status(name).get("registryTags") or {})
            seen[
                f"serving={self.serving(name)} rollout={rollout} tags={tagged} {reachable.get('message', '')}"
            ] += 1
        return f"{dict(seen)}; in flight {len(self.state.in_flight)}; {len(self.pass_seconds)} passes"

    def serving(self, name: str) -> str | None:
        obj = self.target.get(NAMESPACE, name)
        return serving_version_of(obj) if obj else None

    def promote(self, tracking_uri: str, model: str, version: str, names: list[str], timeout: float) -> float:
        """Move `champion` to `version` as MLflow's UI would, then do what a webhook delivery does
        (`State.model_changed`); seconds from the alias moved until every resource in `names` was
        patched to it."""
        answer = httpx.post(
            f"{tracking_uri}/api/2.0/mlflow/registered-models/alias",
            json={"name": model, "alias": "champion", "version": version},
            timeout=30,
        )
        answer.raise_for_status()
        moved = time.perf_counter()
        self.state.model_changed(model)
        wait_until(
            lambda: all(self.serving(n) == version for n in names),
            timeout,
            f"{model} promoted",
            lambda: self.describe(names),
        )
        last = {name: at for at, name, to in self.target.patched if name in names and to == version}
        return max(last.values()) - moved


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, describe: Callable[[], str] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}: {describe()}")
        time.sleep(0.02)


def register_models(server: MlflowServer, names: list[str]) -> None:
    """Registered models with versions 1 and 2 of one phrasebook model's artifacts, `champion` on 1.
    One is logged through the server; the others are written straight into its sqlite store with
    mlflow's own store class (over REST, dozens of writes take most of a minute on a loaded machine)."""
    from mlflow import MlflowClient
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
    from regserve_operator.sandbox.models import log_phrasebook

    first = log_phrasebook(server.url, names[0])
    source = MlflowClient(server.url).get_model_version(names[0], first)
    assert source.source is not None
    model_id = source.model_id or source.source.removeprefix("models:/")
    store = SqlAlchemyStore(f"sqlite:///{Path(server.root) / 'mlflow.db'}")
    try:
        for i, name in enumerate(names):
            if i:
                store.create_registered_model(name)
                store.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
            store.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
            store.set_registered_model_alias(name, "champion", "1" if i else first)
    finally:
        store.engine.dispose()


def rss_kib(pid: int | str = "self") -> int:
    """A process's resident memory, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS")


class PeakRss:
    """This process's RSS (KiB) sampled every 10 ms on a thread: `start` and `peak`."""

    def __init__(self) -> None:
        self.start = self.peak = rss_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_kib())
