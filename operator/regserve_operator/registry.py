"""The registry port: what the operator asks MLflow, and how often.

Two kinds of questions, answered differently:

- "Which version does each selector point at?" is asked for every resource at every poll. It is
  answered from one shared snapshot per tracking server (and credentials): a paged
  `registered-models/search` pass whose results carry each model's aliases and latest version per
  stage. However many resources watch a server, it costs the same requests per interval.
- "What is version N?" (signature, flavors, size, requirements) is asked once per version: registry
  versions are immutable, so the answer is cached. `serving_app.mlmodel` reads it, as it does for
  the serving app: over MLflow's REST API when the artifacts are behind the server's artifact proxy
  (the operator never imports mlflow then); other stores take the mlflow client in a child process
  (see `fetch_facts_over_rest`).

Credentials come from the Secret a resource names, as environment-variable-style keys
(MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*...). They are never logged: the
`Credentials` repr shows key names only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from regserve_operator.ports import Credentials, ModelFacts, NotFound, RegistryRefused, RegistryUnreachable
from regserve_operator.spec import ModelSelector
from serving_app import mlmodel, mlmodel_client
from serving_app.mlmodel import SharedTransport

log = logging.getLogger(__name__)

SEARCH_PATH = "/api/2.0/mlflow/registered-models/search"
SET_TAG_PATH = "/api/2.0/mlflow/model-versions/set-tag"
DELETE_TAG_PATH = "/api/2.0/mlflow/model-versions/delete-tag"
TAG_TIMEOUT_S = 5.0
PAGE_SIZE = 1000
# Versions whose facts are kept: above the versions resources carry, or passes re-read them (LRU thrash).
FACTS_CACHE_SIZE = 4096
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 300.0


@dataclass(frozen=True)
class ModelEntry:
    aliases: Mapping[str, str]  # alias -> version
    stages: Mapping[str, str]  # stage -> latest version in it


@dataclass(frozen=True)
class Snapshot:
    models: Mapping[str, ModelEntry]
    fetched_at: float
    requests: int  # HTTP requests the pass took (pages)


def resolve_in(snapshot: Snapshot, selector: ModelSelector) -> str:
    entry = snapshot.models.get(selector.name)
    if entry is None:
        raise NotFound(f"registered model {selector.name!r} not found")
    if selector.alias:
        version = entry.aliases.get(selector.alias)
        if version is None:
            raise NotFound(f"model {selector.name!r} has no alias {selector.alias!r}")
        return version
    if selector.stage:
        version = entry.stages.get(selector.stage)
        if version is None:
            raise NotFound(f"model {selector.name!r} has no version in stage {selector.stage}")
        return version
    assert selector.version is not None
    return selector.version


def parse_search_page(body: Mapping[str, Any]) -> dict[str, ModelEntry]:
    models: dict[str, ModelEntry] = {}
    for rm in body.get("registered_models") or []:
        # Alias versions are int from a SQL store through the Python client but str over REST: normalise.
        aliases = {a["alias"]: str(a["version"]) for a in rm.get("aliases") or []}
        stages: dict[str, str] = {}
        for mv in rm.get("latest_versions") or []:
            stage = mv.get("current_stage") or "None"
            version = str(mv["version"])
            if stage not in stages or int(version) > int(stages[stage]):
                stages[stage] = version
        models[rm["name"]] = ModelEntry(aliases=aliases, stages=stages)
    return models


class Poller:
    """One tracking server seen with one set of credentials: a snapshot refreshed at most once per max_age.

    Thread-safe; concurrent callers share one fetch. After a failure, further fetches wait for an
    exponential backoff and callers get the last error meanwhile (no hammering a sick server).
    """

    def __init__(
        self,
        tracking_uri: str,
        credentials: Credentials,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[float, bool], None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self._credentials = credentials
        self._transport = transport
        self._clock = clock
        self._on_fetch = on_fetch
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._stale = False
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: RegistryUnreachable | None = None

    def invalidate(self) -> None:
        """Fetch again on next use (a webhook said something changed); keeps error backoff."""
        with self._lock:
            self._stale = True

    def snapshot(self, max_age: float) -> Snapshot:
        with self._lock:
            now = self._clock()
            fresh = (
                self._snapshot is not None and not self._stale and now - self._snapshot.fetched_at < max_age
            )
            if fresh:
                assert self._snapshot is not None
                return self._snapshot
            if self._last_error is not None and now < self._retry_at:
                raise self._last_error
            started = time.perf_counter()
            try:
                models, requests = self._fetch()
            except RegistryUnreachable as exc:
                self._failures += 1
                self._retry_at = now + min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self._failures - 1))
                self._last_error = exc
                if self._on_fetch:
                    self._on_fetch(time.perf_counter() - started, False)
                raise
            if self._on_fetch:
                self._on_fetch(time.perf_counter() - started, True)
            self._failures, self._last_error, self._stale = 0, None, False
            self._snapshot = Snapshot(models=models, fetched_at=self._clock(), requests=requests)
            return self._snapshot

    def _fetch(self) -> tuple[dict[str, ModelEntry], int]:
        models: dict[str, ModelEntry] = {}
        token: str | None = None
        requests = 0
        auth = self._credentials.registry_auth
        with auth.client(self.tracking_uri, self._transport) as client:
            while True:
                params: dict[str, Any] = {"max_results": PAGE_SIZE}
                if token:
                    params["page_token"] = token
                requests += 1
                try:
                    response = client.get(SEARCH_PATH, params=params)
                except httpx.HTTPError as exc:
                    raise RegistryUnreachable(f"{self.tracking_uri}: {type(exc).__name__}: {exc}") from exc
                if response.status_code != 200:
                    # Never echo the body: an auth proxy may reflect headers.
                    raise RegistryUnreachable(
                        f"{self.tracking_uri}: search answered HTTP {response.status_code}"
                    )
                body = response.json()
                models.update(parse_search_page(body))
                token = body.get("next_page_token")
                if not token:
                    return models, requests


FactsFetcher = Callable[[str, Credentials, str, str], ModelFacts]


class Registry:
    """Shared by all resources in the operator: one Poller per (server, credentials), one facts cache."""

    def __init__(
        self,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        fetch_facts: FactsFetcher | None = None,
        facts_cache_size: int = FACTS_CACHE_SIZE,
        on_poll: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._fetch_facts = fetch_facts or self._fetch_facts_over_rest
        self._pollers: dict[tuple[str, str], Poller] = {}
        self._shared: dict[tuple[bool | str, int], SharedTransport] = {}
        self._shared_lock = threading.Lock()
        self._facts: OrderedDict[tuple[str, str, str], ModelFacts] = OrderedDict()
        self._facts_cache_size = facts_cache_size
        self._lock = threading.Lock()
        self._on_poll = on_poll

    def poller(self, tracking_uri: str, credentials: Credentials) -> Poller:
        key = (tracking_uri.rstrip("/"), credentials.fingerprint)
        with self._lock:
            poller = self._pollers.get(key)
            if poller is None:
                on_fetch = None
                if self._on_poll is not None:
                    hook = self._on_poll
                    uri = key[0]

                    def on_fetch(seconds: float, ok: bool) -> None:
                        hook(uri, seconds, ok)

                poller = Poller(
                    tracking_uri,
                    credentials,
                    transport=self._transport_for(credentials),
                    clock=self._clock,
                    on_fetch=on_fetch,
                )
                self._pollers[key] = poller
            return poller

    def resolve(
        self, tracking_uri: str, credentials: Credentials, selector: ModelSelector, max_age: float
    ) -> str:
        if selector.version:
            # Nothing to poll; reading its facts (cached once found) proves the version exists.
            self.facts(tracking_uri, credentials, selector.name, selector.version)
            return selector.version
        return resolve_in(self.poller(tracking_uri, credentials).snapshot(max_age), selector)

    def facts(self, tracking_uri: str, credentials: Credentials, name: str, version: str) -> ModelFacts:
        key = (tracking_uri.rstrip("/"), name, version)
        with self._lock:
            cached = self._facts.get(key)
            if cached is not None:
                self._facts.move_to_end(key)
                return cached
        facts = self._fetch_facts(tracking_uri, credentials, name, version)
        with self._lock:
            self._facts[key] = facts
            while len(self._facts) > self._facts_cache_size:
                self._facts.popitem(last=False)
        return facts

    def set_version_tag(
        self,
        tracking_uri: str,
        credentials: Credentials,
        name: str,
        version: str,
        key: str,
        value: str | None,
    ) -> None:
        """A model version's tag over MLflow's REST API, with the credentials every other request uses."""
        body = {"name": name, "version": version, "key": key}
        with credentials.registry_auth.client(tracking_uri, self._transport_for(credentials)) as client:
            try:
                if value is None:
                    response = client.request("DELETE", DELETE_TAG_PATH, json=body, timeout=TAG_TIMEOUT_S)
                else:
                    response = client.post(SET_TAG_PATH, json={**body, "value": value}, timeout=TAG_TIMEOUT_S)
            except httpx.HTTPError as exc:
                raise RegistryUnreachable(f"{tracking_uri}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in (401, 403):
            raise RegistryRefused(
                f"{tracking_uri}: tag write on {name}/{version} refused (HTTP {response.status_code})"
            )
        if response.status_code == 404 or _does_not_exist(response):
            return  # the version (or the tag) is gone: nothing left to tag
        if response.status_code != 200:
            raise RegistryUnreachable(f"{tracking_uri}: tag write answered HTTP {response.status_code}")

    def close(self) -> None:
        with self._shared_lock:
            shared, self._shared = list(self._shared.values()), {}
        for transport in shared:
            transport.shutdown()

    def _transport_for(self, credentials: Credentials) -> httpx.BaseTransport:
        if self._transport is not None:
            return self._transport
        verify = credentials.registry_auth.verify()
        # A CA bundle mounted from a Secret can be rotated in place: a new file is a new transport.
        key = (verify, _modified_ns(verify) if isinstance(verify, str) else 0)
        with self._shared_lock:
            transport = self._shared.get(key)
            if transport is None:
                transport = self._shared[key] = SharedTransport(verify=verify)
            return transport

    def _fetch_facts_over_rest(
        self, tracking_uri: str, credentials: Credentials, name: str, version: str
    ) -> ModelFacts:
        return fetch_facts_over_rest(
            tracking_uri, credentials, name, version, transport=self._transport_for(credentials)
        )

    def model_changed(self, model_name: str) -> None:
        """A webhook said `model_name` changed somewhere: refetch the snapshots that know it.

        The delivery does not say which server sent it, so pollers that have never seen the model
        are refreshed too (a newly created model must show up)."""
        with self._lock:
            pollers = list(self._pollers.values())
        for poller in pollers:
            poller.invalidate()


def _modified_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0  # httpx reports the missing bundle when the transport is built


def _does_not_exist(response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("error_code") == "RESOURCE_DOES_NOT_EXIST"


# ------------------------------------------------------------------------------------ MLmodel facts


def fetch_facts_over_rest(
    tracking_uri: str,
    credentials: Credentials,
    name: str,
    version: str,
    *,
    transport: httpx.BaseTransport | None = None,
) -> ModelFacts:
    """A version's facts from its MLmodel and requirements.txt, read as `serving_app.mlmodel` reads
    them: through the tracking server's artifact proxy when the version's artifacts are behind it
    (no mlflow import), else with the mlflow client in a child process (`fetch_facts_with_mlflow`).

    Raises NotFound or RegistryUnreachable when the registry cannot answer, and
    `serving_app.mlmodel.Unreadable` (a ValueError, not a RegistryError: the registry answered, and
    reconcile holds the version) for a version whose MLmodel is missing or is no MLmodel."""
    with _port_errors():
        found = mlmodel.read_over_rest(
            tracking_uri,
            name,
            version,
            auth=credentials.registry_auth,
            with_requirements=True,
            transport=transport,
        )
    if found is None:
        return fetch_facts_with_mlflow(tracking_uri, credentials, name, version)
    return _facts(name, version, found)


def fetch_facts_with_mlflow(
    tracking_uri: str, credentials: Credentials, name: str, version: str
) -> ModelFacts:
    """For artifact stores the REST path cannot read: the mlflow client (and the store's client
    library, e.g. boto3) in a child process whose environment carries `credentials`, so the
    operator's own environment never changes and the operator never imports mlflow."""
    with _port_errors():
        found = mlmodel_client.read_in_child(
            tracking_uri, name, version, env=credentials.env, with_requirements=True
        )
    return _facts(name, version, found)


def _facts(name: str, version: str, found: mlmodel.MlmodelFile) -> ModelFacts:
    return ModelFacts(
        name=name,
        version=version,
        signature=found.signature,
        flavors=found.flavors,
        model_size_bytes=found.model_size_bytes,
        requirements=found.requirements,
    )


@contextlib.contextmanager
def _port_errors() -> Iterator[None]:
    """The reader's outcomes in the port's words; Unreadable passes as it is."""
    try:
        yield
    except mlmodel.NotFound as error:
        raise NotFound(str(error)) from error
    except mlmodel.Unreachable as error:
        raise RegistryUnreachable(str(error)) from error
