"""`regserve dev -f rms.yaml [-f more.yaml]`: the operator's reconcile against a Ray cluster on this machine.

The same `reconcile()` the operator runs decides every rollout; the target is the local Ray
dashboard instead of a RayService, statuses live in memory and Events are printed. A Ray cluster is
started when none answers at the dashboard address (and stopped again on exit), Serve listens on
http://127.0.0.1:8000 by default, and an MLflow webhook receiver makes promotions near-instant
(polling stays as the fallback).
"""

from __future__ import annotations

import argparse
import asyncio
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
from regserve_operator.local_ray import LocalCluster, ensure_ray, wanted_ingress_mode
from regserve_operator.probe import probe_app, probe_rollout
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry
from regserve_operator.sandbox.processes import free_port
from regserve_operator.spec import (
    GROUP,
    KIND,
    RegisteredModelServingSpec,
    RegisteredModelServingStatus,
    parse_spec,
)
from regserve_operator.targets.local import LocalRayTarget, ServeDashboard

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


@dataclass(frozen=True)
class Resource:
    owner: Owner
    spec: RegisteredModelServingSpec


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
        if spec.placement is not None:
            # Every resource is an application of the one local cluster already: the same idea.
            log.info(
                "%s: local mode serves it on the local cluster; placement %s is not needed",
                name,
                spec.placement.cluster,
            )
            spec = spec.model_copy(update={"placement": None})
        resources.append(Resource(Owner(name, namespace, f"local-{uuid.uuid4()}"), spec))
    if not resources:
        raise SystemExit(f"{path}: no {KIND} found")
    return resources


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
    from regserve_operator.webhook import start_receiver

    loop = asyncio.new_event_loop()
    runner = loop.run_until_complete(start_receiver(receiver, "127.0.0.1", port))
    thread = threading.Thread(target=loop.run_forever, name="regserve-webhook", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/webhook"
    finally:
        try:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        except TimeoutError:
            # A delivery still being handled (it waits for the reconcile it woke): it is dropped with
            # the receiver; MLflow's retry or the next poll covers it, and stopping must not fail.
            log.warning("webhook receiver stopped with a delivery in flight")
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


@dataclass(frozen=True)
class LocalWebhook:
    """A webhook this session registered, to delete on exit."""

    tracking_uri: str
    webhook_id: str
    name: str


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
    serving: dict[str, str | None] = field(default_factory=dict)

    def event(self, owner: Owner, event: Event) -> None:
        marker = "!" if event.type == "Warning" else "*"
        self.out(f"{time.strftime('%H:%M:%S')} {marker} {owner.name}: {event.reason}: {event.message}")

    def statuses(self, driver: Driver, resources: Sequence[Resource]) -> None:
        for resource in resources:
            status = driver.status(resource.owner)
            if status.serving_version != self.serving.get(resource.owner.name) and _ready(status):
                self.serving[resource.owner.name] = status.serving_version
                self.out(
                    f"{time.strftime('%H:%M:%S')} > {resource.owner.name}: serving version "
                    f"{status.serving_version} of {resource.spec.model.name} at {status.url}"
                )


def _ready(status: RegisteredModelServingStatus) -> bool:
    """Serving and settled: servingVersion is written with the patch, so also nothing in flight."""
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return ready and status.rollout_version is None


# ------------------------------------------------------------------------------------------- main


@dataclass
class DevSession:
    """Everything `regserve dev` runs, usable from the demo and from tests."""

    resources: list[Resource]
    driver: Driver
    target: LocalRayTarget
    cluster: LocalCluster
    reporter: Reporter
    stop_event: threading.Event = field(default_factory=threading.Event)

    def step(self) -> None:
        self.driver.run_once()
        self.reporter.statuses(self.driver, self.resources)

    def run(self, *, until: Callable[[], bool] | None = None, tick_s: float = 0.5) -> None:
        while not self.stop_event.is_set():
            self.step()
            if until is not None and until():
                return
            self.stop_event.wait(tick_s)

    def status(self, name: str) -> RegisteredModelServingStatus:
        resource = next(r for r in self.resources if r.owner.name == name)
        return self.driver.status(resource.owner)


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
        required=True,
        help="YAML with RegisteredModelServing resources (repeatable: all share the local cluster)",
    )
    parser.add_argument("--dashboard", default=DEFAULT_DASHBOARD, help="Ray dashboard URL (started if down)")
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for a Ray cluster started here")
    parser.add_argument("--webhook-port", type=int, default=0, help="receiver port (0: a free one; -1: off)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    resources = load_resource_files(args.file)
    session = make_session(
        resources, dashboard_url=args.dashboard, serve_port=args.serve_port, num_cpus=args.num_cpus
    )
    signal.signal(signal.SIGTERM, lambda *_: session.stop_event.set())
    try:
        with _maybe_webhook(session, resources, args.webhook_port):
            print("regserve: reconciling; Ctrl-C stops", flush=True)
            session.run()
    except KeyboardInterrupt:
        pass
    finally:
        session.cluster.stop()
    return 0


@contextmanager
def _maybe_webhook(session: DevSession, resources: Sequence[Resource], port: int) -> Iterator[None]:
    if port < 0:
        yield
        return
    secret = secrets.token_urlsafe(32)
    with webhook_receiver(session.driver, port or free_port(), secret) as url:
        registered: list[LocalWebhook] = []
        try:
            for tracking_uri in sorted({r.spec.registry.tracking_uri for r in resources}):
                webhook = register_local_webhook(tracking_uri, url, secret)
                if webhook is not None:
                    registered.append(webhook)
                    print(f"regserve: MLflow at {tracking_uri} posts registry events to {url}", flush=True)
            yield
        finally:
            for webhook in registered:
                delete_local_webhook(webhook)


def status_summary(status: RegisteredModelServingStatus) -> dict[str, Any]:
    return {
        "resolvedVersion": status.resolved_version,
        "servingVersion": status.serving_version,
        "conditions": {c.type: f"{c.status} {c.reason}: {c.message}" for c in status.conditions or []},
        "rolloutVersion": status.rollout_version,
        "rejected": status.rejected.model_dump() if status.rejected else None,
    }
