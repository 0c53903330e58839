"""`regserve dev [-f rms.yaml ...]`: the operator's reconcile against a Ray cluster on this machine.

The same `reconcile()` the operator runs decides every rollout; the target is the local Ray
dashboard instead of a RayService, statuses live in memory and Events are printed. A Ray cluster is
started when none answers at the dashboard address (and stopped again on exit), Serve listens on
http://127.0.0.1:8000 by default, and an MLflow webhook receiver makes promotions near-instant
(polling stays as the fallback).

Resources come from the `-f` files at start and, while it runs, from its control API (`local_control.py`),
which `local_client.LocalControlClient` finds through the session file.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from regserve_operator.builders import BuildDefaults, Owner
from regserve_operator.decide import Event
from regserve_operator.driver import Driver
from regserve_operator.local_client import SESSION_ENV, LocalSession, session_path
from regserve_operator.local_control import control_server, refuse_if_live, session_file
from regserve_operator.local_ray import LocalCluster, ensure_ray, wanted_ingress_mode
from regserve_operator.monitoring import probe_monitoring
from regserve_operator.probe import probe_app, probe_rollout
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.sandbox.processes import free_port
from regserve_operator.spec import (
    GROUP,
    KIND,
    RegisteredModelServingSpec,
    RegisteredModelServingStatus,
    manifest,
    parse_spec,
    status_to_wire,
)
from regserve_operator.targets.local import LocalRayTarget, ServeDashboard
from regserve_operator.threaded_http import serve_on_thread

if TYPE_CHECKING:
    from regserve_operator.webhook import Receiver

log = logging.getLogger("regserve.dev")

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
PASS_DEADLINE_S = 5.0  # the operator's default `pass_deadline_seconds`
# Each session registers a webhook of its own (`regserve-local-<random>`) and deletes it on exit, so
# two sessions on one MLflow do not take each other's deliveries, and none outlives its receiver.
WEBHOOK_PREFIX = "regserve-local-"
# A webhook left by a session that could not delete it (killed) is refused by nothing and retried by
# MLflow a few times per event; deleting it must not hold up an exit.
WEBHOOK_DELETE_TIMEOUT_S = 10.0
# A delete answers once Ray has removed the resource's Serve apps, or after this: Ray drains each
# replica first (20 s at most by Serve's default), and a 2-core machine under load took 30 s.
APP_DELETE_WAIT_S = 60.0


@dataclass(frozen=True)
class Resource:
    owner: Owner
    spec: RegisteredModelServingSpec
    # The spec as the user wrote it, shown back by the control API (`spec` has placement dropped).
    applied: dict[str, Any] = field(default_factory=dict, compare=False)


def load_resources(path: Path) -> list[Resource]:
    """Every RegisteredModelServing in a YAML file (one or several documents)."""
    resources = []
    for document in yaml.safe_load_all(path.read_text()):
        if not document:
            continue
        api_version = str(document.get("apiVersion", ""))
        if document.get("kind") != KIND or not api_version.startswith(f"{GROUP}/"):
            raise SystemExit(
                f"{path}: expected kind {KIND} ({GROUP}), got {document.get('kind')} {api_version}"
            )
        metadata = document.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            raise SystemExit(f"{path}: a {KIND} needs metadata.name")
        try:
            spec = parse_spec(document.get("spec") or {})
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise SystemExit(f"{path}: {name}: invalid spec:\n{error}") from None
        namespace = metadata.get("namespace", "default")
        owner = Owner(name, namespace, f"local-{uuid.uuid4()}")
        resources.append(Resource(owner, local_spec(name, spec), dict(document.get("spec") or {})))
    if not resources:
        raise SystemExit(f"{path}: no {KIND} found")
    return resources


def local_spec(name: str, spec: RegisteredModelServingSpec) -> RegisteredModelServingSpec:
    if spec.placement is None:
        return spec
    # Every resource is an application of the one local cluster already: the same idea.
    log.info(
        "%s: local mode serves it on the local cluster; placement %s is not needed",
        name,
        spec.placement.cluster,
    )
    return spec.model_copy(update={"placement": None})


def load_resource_files(paths: Sequence[Path]) -> list[Resource]:
    """Every RegisteredModelServing in the files, which share the local cluster; names must differ."""
    resources = [resource for path in paths for resource in load_resources(path)]
    seen: set[tuple[str, str]] = set()
    for resource in resources:
        key = (resource.owner.namespace, resource.owner.name)
        if key in seen:
            raise SystemExit(f"{key[0]}/{key[1]} is defined more than once")
        seen.add(key)
    return resources


# ----------------------------------------------------------------------------------------- webhook


@contextmanager
def webhook_receiver(driver: Driver, port: int, secret: str) -> Iterator[str]:
    """Run the operator's webhook receiver on a thread of its own; yields its URL."""
    from regserve_operator.webhook import Receiver

    with serve_receiver(Receiver(secret, driver.model_changed), port) as url:
        yield url


@contextmanager
def serve_receiver(receiver: Receiver, port: int) -> Iterator[str]:
    """Serve a `webhook.Receiver` on 127.0.0.1:`port` from a thread with its own event loop."""
    # A delivery still being handled when it stops (it waits for the reconcile it woke) is dropped with
    # the receiver; MLflow's retry or the next poll covers it.
    with serve_on_thread(
        receiver.app(),
        "127.0.0.1",
        port,
        name="regserve-webhook",
        stop_timeout_s=10,
        in_flight="webhook receiver stopped with a delivery in flight",
    ) as bound:
        yield f"http://127.0.0.1:{bound}/webhook"


@dataclass(frozen=True)
class LocalWebhook:
    """A webhook this session registered, to delete on exit."""

    tracking_uri: str
    webhook_id: str
    name: str


@dataclass
class SessionWebhooks:
    """The webhooks of a session: one per tracking URI, registered as resources naming it arrive."""

    url: str
    secret: str
    registered: list[LocalWebhook] = field(default_factory=list)
    _tried: set[str] = field(default_factory=set)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure(self, tracking_uri: str) -> None:
        with self._lock:
            if tracking_uri in self._tried:
                return
            self._tried.add(tracking_uri)
        webhook = register_local_webhook(tracking_uri, self.url, self.secret)
        if webhook is not None:
            with self._lock:
                self.registered.append(webhook)
            print(f"regserve: MLflow at {tracking_uri} posts registry events to {self.url}", flush=True)

    def ensure_soon(self, tracking_uri: str) -> None:
        """`ensure` aside: MLflow's client retries for minutes against a server that does not answer,
        and the resource that named it must not wait for that (polling covers it meanwhile)."""
        with self._lock:
            if tracking_uri in self._tried:
                return
            worker = threading.Thread(
                target=self.ensure, args=(tracking_uri,), name="regserve-webhook-register", daemon=True
            )
            self._workers.append(worker)
        worker.start()

    def close(self) -> None:
        with self._lock:
            workers = list(self._workers)
        for worker in workers:  # a registration finishing after this would outlive its receiver
            worker.join(WEBHOOK_DELETE_TIMEOUT_S)
        with self._lock:
            registered, self.registered = self.registered, []
        for webhook in registered:
            delete_local_webhook(webhook)


def register_local_webhook(tracking_uri: str, url: str, secret: str) -> LocalWebhook | None:
    from regserve_operator.webhook import register_webhook

    os.environ["REGSERVE_WEBHOOK_SECRET"] = secret
    name = f"{WEBHOOK_PREFIX}{secrets.token_hex(6)}"
    try:
        webhook_id = register_webhook(
            tracking_uri=tracking_uri, url=url, name=name, secret_env="REGSERVE_WEBHOOK_SECRET"
        )
    except Exception as error:  # webhooks need a SQL-backed `mlflow server`; polling still works
        print(f"regserve: no MLflow webhook ({error}); promotions are picked up by polling", flush=True)
        return None
    return LocalWebhook(tracking_uri, webhook_id, name)


def delete_local_webhook(webhook: LocalWebhook) -> bool:
    """Delete a webhook this session registered, within a bounded time; False (and said) if it could not."""
    from mlflow import MlflowClient

    deleted: list[bool] = []

    def delete() -> None:
        try:
            MlflowClient(tracking_uri=webhook.tracking_uri).delete_webhook(webhook.webhook_id)
        except Exception as error:  # said below, once the wait is over
            log.info("deleting webhook %s failed: %s", webhook.name, error)
            return
        deleted.append(True)

    # MLflow's client retries for minutes against a server that is gone: run it aside, wait a bounded time.
    worker = threading.Thread(target=delete, name="regserve-webhook-delete", daemon=True)
    worker.start()
    worker.join(WEBHOOK_DELETE_TIMEOUT_S)
    if deleted:
        return True
    print(
        f"regserve: could not delete MLflow webhook {webhook.name} at {webhook.tracking_uri}; "
        "delete it with MlflowClient().delete_webhook() if that server is still used",
        flush=True,
    )
    return False


# ------------------------------------------------------------------------------------------ report


@dataclass
class Reporter:
    """Prints Events and serving-version transitions, once each."""

    out: Callable[[str], None] = print
    serving: dict[tuple[str, str], str | None] = field(default_factory=dict)

    def event(self, owner: Owner, event: Event) -> None:
        marker = "!" if event.type == "Warning" else "*"
        self.out(f"{time.strftime('%H:%M:%S')} {marker} {owner.name}: {event.reason}: {event.message}")

    def statuses(self, driver: Driver, resources: Sequence[Resource]) -> None:
        for resource in resources:
            key = (resource.owner.namespace, resource.owner.name)
            try:
                status = driver.status(resource.owner)
            except KeyError:  # deleted through the control API meanwhile
                continue
            if status.serving_version != self.serving.get(key) and _ready(status):
                self.serving[key] = status.serving_version
                self.out(
                    f"{time.strftime('%H:%M:%S')} > {resource.owner.name}: serving version "
                    f"{status.serving_version} of {resource.spec.model.name} at {status.url}"
                )

    def forget(self, owner: Owner) -> None:
        self.serving.pop((owner.namespace, owner.name), None)


def _ready(status: RegisteredModelServingStatus) -> bool:
    """Serving and settled: servingVersion is written with the patch, so also nothing in flight."""
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return ready and status.rollout_version is None


# ------------------------------------------------------------------------------------------- main


@dataclass
class DevSession:
    """Everything `regserve dev` runs, usable from the demo and from tests.

    `resources` changes while it runs (the control API's thread): read it through `snapshot()`."""

    resources: list[Resource]
    driver: Driver
    target: LocalRayTarget
    cluster: LocalCluster
    reporter: Reporter
    stop_event: threading.Event = field(default_factory=threading.Event)
    # Called with each resource the control API adds (e.g. to register a webhook for its registry).
    on_new_resource: Callable[[Resource], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # One change at a time per session: a PUT racing a DELETE of the same name sees one order.
    _changing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def step(self) -> None:
        self.driver.run_once()
        self.reporter.statuses(self.driver, self.snapshot())

    def snapshot(self) -> list[Resource]:
        with self._lock:
            return list(self.resources)

    def find(self, namespace: str, name: str) -> Resource | None:
        return next(
            (r for r in self.snapshot() if (r.owner.namespace, r.owner.name) == (namespace, name)), None
        )

    def put(
        self, namespace: str, name: str, spec: RegisteredModelServingSpec, applied: dict[str, Any]
    ) -> Resource:
        """Add a resource or change its spec (its uid stays), as `kubectl apply` does."""
        with self._changing:
            existing = self.find(namespace, name)
            owner = existing.owner if existing else Owner(name, namespace, f"local-{uuid.uuid4()}")
            resource = Resource(owner, local_spec(name, spec), applied)
            self.driver.apply(owner, resource.spec)
            with self._lock:
                self.resources = [
                    r for r in self.resources if (r.owner.namespace, r.owner.name) != (namespace, name)
                ] + [resource]
        if existing is None:
            self.reporter.out(f"{time.strftime('%H:%M:%S')} + {name}: applied ({namespace})")
            wanted = spec.serving.ingress_mode
            if self.cluster.ingress_mode is not None and wanted != self.cluster.ingress_mode:
                self.reporter.out(
                    f"{time.strftime('%H:%M:%S')} ! {name}: asks for ingress mode {wanted}; the local "
                    f"cluster runs {self.cluster.ingress_mode} (start `regserve dev` with it in a file)"
                )
            if self.on_new_resource is not None:
                self.on_new_resource(resource)
        else:
            self.reporter.out(f"{time.strftime('%H:%M:%S')} ~ {name}: spec applied ({namespace})")
        return resource

    def remove(self, namespace: str, name: str) -> tuple[Resource, RegisteredModelServingStatus] | None:
        """Delete a resource: stop reconciling it, remove its Serve applications from the cluster and
        the deployment-state tags it wrote in MLflow (as the operator's finalizer does, bounded).
        When the cluster refuses the removal the resource is kept, so a retry can finish it."""
        with self._changing:
            resource = self.find(namespace, name)
            if resource is None:
                return None
            with self._lock:
                self.resources = [r for r in self.resources if r is not resource]
            status = self.driver.remove(resource.owner) or RegisteredModelServingStatus()
            try:
                gone = self.target.delete(namespace, name, wait_s=APP_DELETE_WAIT_S)
            except Exception:
                self.driver.apply(resource.owner, resource.spec, status)
                with self._lock:
                    self.resources.append(resource)
                raise
            self.reporter.forget(resource.owner)
        if not gone:
            self.reporter.out(
                f"{time.strftime('%H:%M:%S')} ! {name}: Ray is still deleting its Serve application"
            )
        self._remove_tags(resource, status)
        self.reporter.out(f"{time.strftime('%H:%M:%S')} - {name}: deleted ({namespace})")
        return resource, status

    def _remove_tags(self, resource: Resource, status: RegisteredModelServingStatus) -> None:
        from regserve_operator.finalizer import remove_tags

        body = {
            "metadata": {"namespace": resource.owner.namespace, "name": resource.owner.name},
            "spec": resource.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
            "status": status_to_wire(status),
        }
        removal = remove_tags(body, self.driver.deps.registry, self.target)
        if removal.kept:
            self.reporter.out(
                f"{time.strftime('%H:%M:%S')} ! {resource.owner.name}: MLflow tags kept on versions "
                f"{', '.join(removal.kept)}: {removal.problem}"
            )

    # -------------------------------------------------------------- control API (ControlBackend)

    def object_of(self, resource: Resource) -> dict[str, Any] | None:
        """The resource as the API server would show it; None once it is gone."""
        try:
            status = self.driver.status(resource.owner)
        except KeyError:
            return None
        return wire_object(resource, self.driver.generation(resource.owner) or 1, status)

    def put_object(
        self, namespace: str, name: str, spec: RegisteredModelServingSpec, applied: dict[str, Any]
    ) -> dict[str, Any]:
        resource = self.put(namespace, name, spec, applied)
        return self.object_of(resource) or wire_object(resource, 1, RegisteredModelServingStatus())

    def get_object(self, namespace: str, name: str) -> dict[str, Any] | None:
        resource = self.find(namespace, name)
        return None if resource is None else self.object_of(resource)

    def list_objects(self, namespace: str | None) -> list[dict[str, Any]]:
        chosen = [r for r in self.snapshot() if namespace is None or r.owner.namespace == namespace]
        chosen.sort(key=lambda r: (r.owner.namespace, r.owner.name))
        return [found for r in chosen if (found := self.object_of(r)) is not None]

    def delete_object(self, namespace: str, name: str) -> dict[str, Any] | None:
        generation = None
        found = self.find(namespace, name)
        if found is not None:
            generation = self.driver.generation(found.owner)
        removed = self.remove(namespace, name)
        if removed is None:
            return None
        resource, status = removed
        return wire_object(resource, generation or 1, status)

    def run(self, *, until: Callable[[], bool] | None = None, tick_s: float = 0.5) -> None:
        while not self.stop_event.is_set():
            self.step()
            if until is not None and until():
                return
            self.stop_event.wait(tick_s)

    def status(self, name: str) -> RegisteredModelServingStatus:
        resource = next(r for r in self.snapshot() if r.owner.name == name)
        return self.driver.status(resource.owner)


def wire_object(resource: Resource, generation: int, status: RegisteredModelServingStatus) -> dict[str, Any]:
    """A RegisteredModelServing as the API server shows it; the status as the operator writes it."""
    owner = resource.owner
    spec = resource.applied or resource.spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    body = manifest(owner.name, spec, namespace=owner.namespace)
    body["metadata"] |= {"generation": generation, "uid": owner.uid}
    body["status"] = status_to_wire(status)
    return body


def make_session(
    resources: list[Resource],
    *,
    dashboard_url: str = DEFAULT_DASHBOARD,
    serve_port: int = 8000,
    num_cpus: int = 8,
    settle_seconds: float = 2.0,
    out: Callable[[str], None] = print,
    log_dir: Path = Path(".regserve"),
) -> DevSession:
    ingress_mode = wanted_ingress_mode(r.spec.serving.ingress_mode for r in resources)
    cluster = ensure_ray(
        dashboard_url,
        ingress_mode=ingress_mode,
        num_cpus=num_cpus,
        log_dir=log_dir,
        # One cluster for every resource: on when any of them asks.
        ingress_metrics=any(r.spec.serving.ingress_metrics for r in resources),
    )
    target = LocalRayTarget(ServeDashboard(dashboard_url, token=cluster.token()), serve_port=serve_port)
    import ray

    deps = Deps(
        registry=Registry(),
        target=target,
        defaults=BuildDefaults(image=f"rayproject/ray:{ray.__version__}-py311", ray_version=ray.__version__),
        settle_seconds=settle_seconds,
        probe=probe_app,
        rollout_probe=probe_rollout,
        monitoring_probe=probe_monitoring,
    )
    reporter = Reporter(out=out)
    # As the operator's loop: one resource on a slow registry does not hold up the others' promotions.
    driver = Driver(deps, on_event=reporter.event, tick_seconds=0.5, pass_deadline_s=PASS_DEADLINE_S)
    for resource in resources:
        driver.apply(resource.owner, resource.spec)
    return DevSession(resources, driver, target, cluster, reporter)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="regserve dev", description=__doc__.splitlines()[0] if __doc__ else ""
    )
    parser.add_argument(
        "-f",
        "--file",
        type=Path,
        action="append",
        default=[],
        help="YAML with RegisteredModelServing resources (repeatable: all share the local cluster; "
        "none: start empty, resources come through the control API)",
    )
    # The environment gives defaults too, for what starts `regserve dev` without a command line of its
    # own (`mlflow deployments run-local -t regserve-local`).
    parser.add_argument(
        "--dashboard",
        default=os.environ.get("REGSERVE_DEV_DASHBOARD", DEFAULT_DASHBOARD),
        help="Ray dashboard URL, started if down ($REGSERVE_DEV_DASHBOARD)",
    )
    parser.add_argument(
        "--serve-port",
        type=int,
        default=os.environ.get("REGSERVE_DEV_SERVE_PORT", "8000"),
        help="($REGSERVE_DEV_SERVE_PORT)",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=os.environ.get("REGSERVE_DEV_NUM_CPUS", "8"),
        help="logical CPUs for a Ray cluster started here ($REGSERVE_DEV_NUM_CPUS)",
    )
    parser.add_argument("--webhook-port", type=int, default=0, help="receiver port (0: a free one; -1: off)")
    parser.add_argument(
        "--session-file",
        type=Path,
        default=None,
        help=f"where clients find the control API (default: ${SESSION_ENV} or ~/.regserve/dev-session.json)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    session_file_path = args.session_file or session_path()
    # Before a Ray cluster is started for nothing.
    refuse_if_live(session_file_path)
    resources = load_resource_files(args.file)
    session = make_session(
        resources, dashboard_url=args.dashboard, serve_port=args.serve_port, num_cpus=args.num_cpus
    )
    signal.signal(signal.SIGTERM, lambda *_: session.stop_event.set())
    # Ctrl-C stops it even when started where SIGINT is ignored (a background job of a script): Python
    # leaves an inherited SIG_IGN in place, and the interrupt would be lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    token = secrets.token_urlsafe(32)
    try:
        with (
            _maybe_webhook(session, args.webhook_port),
            control_server(session, token) as control_url,
            session_file(
                session_file_path,
                LocalSession(control_url, token, session.target.url("", "", ""), os.getpid()),
            ),
        ):
            print(f"regserve: control API at {control_url} (session file {session_file_path})", flush=True)
            print("regserve: reconciling; Ctrl-C stops", flush=True)
            session.run()
    except KeyboardInterrupt:
        pass
    finally:
        print(f"{time.strftime('%H:%M:%S')} regserve: stopping", flush=True)
        session.cluster.stop()
        print(f"{time.strftime('%H:%M:%S')} regserve: stopped", flush=True)
    return 0


@contextmanager
def _maybe_webhook(session: DevSession, port: int) -> Iterator[SessionWebhooks | None]:
    """The receiver and a webhook per tracking URI: those of the files now, later ones as they come."""
    if port < 0:
        yield None
        return
    secret = secrets.token_urlsafe(32)
    with webhook_receiver(session.driver, port or free_port(), secret) as url:
        webhooks = SessionWebhooks(url, secret)
        try:
            for tracking_uri in sorted({r.spec.registry.tracking_uri for r in session.snapshot()}):
                webhooks.ensure(tracking_uri)
            session.on_new_resource = lambda resource: webhooks.ensure_soon(
                resource.spec.registry.tracking_uri
            )
            yield webhooks
        finally:
            session.on_new_resource = None
            webhooks.close()


def status_summary(status: RegisteredModelServingStatus) -> dict[str, Any]:
    return {
        "resolvedVersion": status.resolved_version,
        "servingVersion": status.serving_version,
        "conditions": {c.type: f"{c.status} {c.reason}: {c.message}" for c in status.conditions or []},
        "rolloutVersion": status.rollout_version,
        "rejected": status.rejected.model_dump() if status.rejected else None,
    }
