"""In-memory stand-ins for the reconcile's ports."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jsonpatch
from regserve_operator.decide import Outcome
from regserve_operator.plan import Plan
from regserve_operator.ports import Credentials, CredentialsUnavailable, ModelFacts, NotFound, TargetConflict
from regserve_operator.reconcile import Deps, reconcile
from regserve_operator.registry import Registry
from regserve_operator.spec import RegisteredModelServingSpec, RegisteredModelServingStatus

from .helpers import DEFAULTS, OWNER


def signature(**columns: str) -> dict[str, Any]:
    """Required input columns `name=mlflow type`, in the form MLmodel stores a signature (no mlflow
    import: the registry benchmark measures the operator's memory with these fakes loaded)."""
    inputs = [{"type": t, "name": n, "required": True} for n, t in columns.items()]
    return {"inputs": json.dumps(inputs), "outputs": None, "params": None}


class FakeTarget:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.applied: list[Plan] = []
        self.secrets: dict[tuple[str, str], dict[str, str]] = {}
        self.secret_reads: list[tuple[str, str]] = []
        # RegisteredModelServings as the API server would list them, by (namespace, cluster).
        self.peers: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._rv = 0

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        obj = self.objects.get((namespace, name))
        return copy.deepcopy(obj) if obj else None

    def apply(self, plan: Plan) -> None:
        self.applied.append(plan)
        key = (plan.namespace, plan.name)
        self._rv += 1
        if plan.action == "create":
            obj = copy.deepcopy(plan.desired)
        else:
            try:
                obj = jsonpatch.apply_patch(self.objects[key], plan.patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise TargetConflict(str(exc)) from exc
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self.objects[key] = obj

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.peers.get((namespace, cluster), []))

    def read_credentials(self, namespace: str, secret_name: str) -> Mapping[str, str]:
        self.secret_reads.append((namespace, secret_name))
        try:
            return self.secrets[(namespace, secret_name)]
        except KeyError:
            raise CredentialsUnavailable(f"secret {namespace}/{secret_name} not found") from None

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        return f"http://{name}-serve-svc.{namespace}.svc:8000{route_prefix}"

    def set_app_status(self, status: str, message: str = "", name: str = OWNER.name) -> None:
        obj = self.objects[(OWNER.namespace, name)]
        obj["status"] = {
            "conditions": [{"type": "Ready", "status": "True" if status == "RUNNING" else "False"}],
            "activeServiceStatus": {
                "applicationStatuses": {OWNER.name: {"status": status, "message": message}}
            },
        }


@dataclass
class FakeRegistryServer:
    """The registry's state: aliases per model and facts per version."""

    aliases: dict[str, str] = field(default_factory=dict)
    facts: dict[str, ModelFacts] = field(default_factory=dict)
    down: bool = False
    model: str = "translation_model"

    def add(self, version: str, sig: Mapping[str, Any] | None, size: int = 10 * 1024**2) -> None:
        self.facts[version] = ModelFacts(
            self.model, version, sig, ("python_function",), size, ("mlflow==3.17.2",)
        )

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            if self.down:
                return httpx.Response(503)
            aliases = [{"alias": a, "version": v} for a, v in self.aliases.items()]
            return httpx.Response(200, json={"registered_models": [{"name": self.model, "aliases": aliases}]})

        return httpx.MockTransport(handler)

    def fetch_facts(self, uri: str, creds: Credentials, name: str, version: str) -> ModelFacts:
        if version not in self.facts:
            raise NotFound(f"{name}/{version} not found")
        return self.facts[version]


class World:
    """Runs reconciles like the operator would, carrying status from one to the next."""

    def __init__(self, spec: RegisteredModelServingSpec, **deps: Any) -> None:
        self.spec = spec
        self.server = FakeRegistryServer()
        self.target = FakeTarget()
        self.target.secrets[(OWNER.namespace, "mlflow-auth")] = {"MLFLOW_TRACKING_TOKEN": "tok"}
        self.clock = 0.0
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.registry = Registry(
            transport=self.server.transport(), fetch_facts=self.server.fetch_facts, clock=lambda: self.clock
        )
        self.deps = Deps(
            registry=self.registry, target=self.target, defaults=DEFAULTS, settle_seconds=5, **deps
        )
        self.status = RegisteredModelServingStatus()
        self.events: list[tuple[str, str]] = []

    def advance(self, seconds: float) -> None:
        self.clock += seconds
        self.now += timedelta(seconds=seconds)

    def step(self, seconds: float = 31) -> Outcome:
        self.advance(seconds)
        outcome = reconcile(OWNER, 1, self.spec, self.status, self.deps, self.now)
        self.status = outcome.status
        self.events += [(e.type, e.reason) for e in outcome.events]
        return outcome

    def rayservice(self) -> dict[str, Any]:
        obj = self.target.get(OWNER.namespace, OWNER.name)
        assert obj is not None
        return obj
