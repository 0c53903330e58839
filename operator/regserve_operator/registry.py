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

from regserve_operator.pinning import promoted_versions
from regserve_operator.ports import (
    Credentials,
    ModelFacts,
    NotFound,
    RegistryRefused,
    RegistryUnreachable,
    VersionRunRef,
)
from regserve_operator.spec import ModelSelector
from serving_app import mlmodel, mlmodel_client
from serving_app.mlmodel import Deadline, SharedTransport, bounded_request, redirect_note
from serving_app.monitoring.tracking import RESOURCE_TAG, SinkRefused, TrackingRest, version_run

log = logging.getLogger(__name__)

SEARCH_PATH = "/api/2.0/mlflow/registered-models/search"
SET_TAG_PATH = "/api/2.0/mlflow/model-versions/set-tag"
DELETE_TAG_PATH = "/api/2.0/mlflow/model-versions/delete-tag"
TAG_TIMEOUT_S = 5.0
PAGE_SIZE = 1000
# A whole search pass (every page) ends within this, and has at most MAX_SEARCH_PAGES pages (a million
# models at PAGE_SIZE): a server that trickles its answers or hands out page tokens for ever is given up on.
SEARCH_DEADLINE_S = 30.0
MAX_SEARCH_PAGES = 1000
SEARCH_PAGE_MAX_BYTES = mlmodel.ANSWER_MAX_BYTES
# All pages of one pass together: a server handing out large pages for ever is given up on long before
# MAX_SEARCH_PAGES x SEARCH_PAGE_MAX_BYTES (8 GB) were read. Pages are parsed one at a time and dropped.
SEARCH_PASS_MAX_BYTES = 64 * 1024 * 1024
# A snapshot fetched for an invalidation is refetched for the next one only once it is this old: anyone
# holding the webhook secret can send deliveries, and a flood of them costs each server one search per
# interval. The first invalidation after a poll is fetched at once (a promotion waits for nothing).
MIN_REFETCH_S = 2.0
# Pollers (one per server and credentials) not asked for this long, or 10x their longest poll interval,
# are dropped (a changed tracking URI or a rotated Secret value leaves its old one behind); and at most
# MAX_POLLERS are kept, least recently used first out. Shared transports no poller holds go after as long.
POLLER_IDLE_S = 3600.0
POLLER_IDLE_POLLS = 10
MAX_POLLERS = 4096
SWEEP_INTERVAL_S = 60.0
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


class MalformedAnswer(ValueError):
    """A registry answer that is JSON but not shaped as MLflow's. The message names the field, never
    the answer's content."""


def parse_search_page(body: object) -> dict[str, ModelEntry]:
    """The models of one `registered-models/search` page; MalformedAnswer for any other shape."""
    if not isinstance(body, dict):
        raise MalformedAnswer("the page is not a JSON object")
    models: dict[str, ModelEntry] = {}
    for i, rm in enumerate(_list_of_objects(body.get("registered_models"), "registered_models")):
        where = f"registered_models[{i}]"
        name = rm.get("name")
        if not isinstance(name, str) or not name:
            raise MalformedAnswer(f"{where}.name is not a string")
        aliases: dict[str, str] = {}
        for a in _list_of_objects(rm.get("aliases"), f"{where}.aliases"):
            alias = a.get("alias")
            if not isinstance(alias, str):
                raise MalformedAnswer(f"{where}.aliases: an alias is not a string")
            # Alias versions are int from a SQL store through the Python client but str over REST.
            aliases[alias] = _version(a.get("version"), f"{where}.aliases")
        stages: dict[str, str] = {}
        for mv in _list_of_objects(rm.get("latest_versions"), f"{where}.latest_versions"):
            stage = mv.get("current_stage") or "None"
            if not isinstance(stage, str):
                raise MalformedAnswer(f"{where}.latest_versions: a stage is not a string")
            version = _version(mv.get("version"), f"{where}.latest_versions")
            if stage not in stages or int(version) > int(stages[stage]):
                stages[stage] = version
        models[name] = ModelEntry(aliases=aliases, stages=stages)
    return models


def next_page_token(body: Mapping[str, Any]) -> str | None:
    token = body.get("next_page_token")
    if token is not None and not isinstance(token, str):
        raise MalformedAnswer("next_page_token is not a string")
    return token or None


def _list_of_objects(value: object, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise MalformedAnswer(f"{where} is not a list of objects")
    return value


def _version(value: object, where: str) -> str:
    """A registry version number: MLflow's are positive integers (and go into statuses and labels)."""
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 18):
        raise MalformedAnswer(f"{where}: a version is not a number")
    return text


@dataclass
class _Fetch:
    """One search pass in progress; callers arriving meanwhile wait for it instead of fetching too."""

    generation: int
    done: threading.Event
    snapshot: Snapshot | None = None
    error: str | None = None
    refetch: bool = False  # for an invalidation, of a snapshot still within its max_age


class Poller:
    """One tracking server seen with one set of credentials: a snapshot refreshed at most once per max_age.

    Thread-safe; concurrent callers share one fetch, and wait for it at most `wait_s` (a pass's
    workers are not all held by one slow server). No lock is held during the fetch, so `invalidate`
    (a webhook delivery, on the operator's event loop) never waits on the network; an invalidation
    during a fetch makes the next caller fetch again; a snapshot fetched for an invalidation is
    fetched again for the next one only once it is `min_refetch_s` old. After a failure, further
    fetches wait for an exponential backoff and callers get the last error meanwhile (no hammering a
    sick server). A pass reads at most `max_pass_bytes` of answers and keeps only the parsed entries.
    """

    def __init__(
        self,
        tracking_uri: str,
        credentials: Credentials,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_fetch: Callable[[float, bool], None] | None = None,
        deadline_s: float = SEARCH_DEADLINE_S,
        wait_s: float | None = None,
        max_pages: int = MAX_SEARCH_PAGES,
        max_pass_bytes: int = SEARCH_PASS_MAX_BYTES,
        min_refetch_s: float = MIN_REFETCH_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.tracking_uri = tracking_uri.rstrip("/")
        self._credentials = credentials
        self._transport = transport
        self._clock = clock
        self._on_fetch = on_fetch
        self._deadline_s = deadline_s
        self._wait_s = deadline_s if wait_s is None else wait_s
        self._max_pages = max_pages
        self._max_pass_bytes = max_pass_bytes
        self._min_refetch_s = min_refetch_s
        self._sleep = sleep
        self.longest_max_age = 0.0  # the longest poll interval asked for: how long it may sit unused
        self._lock = threading.Lock()  # guards the fields below; never held across I/O
        self._snapshot: Snapshot | None = None
        self._generation = 0  # invalidations so far
        self._snapshot_generation = 0  # the invalidations the snapshot's fetch started after
        self._snapshot_refetched = False  # the snapshot was fetched for an invalidation
        self._running: _Fetch | None = None
        self._failures = 0
        self._retry_at = 0.0
        # The failure's message, raised anew for each caller: re-raising one exception object grows
        # its traceback (and the frames it keeps alive) with every raise.
        self._last_error: str | None = None

    @property
    def transport(self) -> httpx.BaseTransport | None:
        return self._transport

    def invalidate(self) -> None:
        """Fetch again on next use (a webhook said something changed); keeps error backoff."""
        with self._lock:
            self._generation += 1

    def snapshot(self, max_age: float) -> Snapshot:
        give_up_at = time.monotonic() + self._wait_s
        slept_on: Snapshot | None = None
        while True:
            too_soon = 0.0
            waiting: _Fetch | None = None
            with self._lock:
                now = self._clock()
                self.longest_max_age = max(self.longest_max_age, max_age)
                snapshot = self._snapshot
                if snapshot is not None and now - snapshot.fetched_at < max_age:
                    if self._snapshot_generation == self._generation:
                        return snapshot
                    # Invalidated: fetched again at once, but a snapshot that was itself fetched for an
                    # invalidation only once it is min_refetch_s old. The caller waits for that rather
                    # than take the old snapshot (it was woken for a change the old one may miss).
                    # Having waited once on this snapshot, it goes on.
                    if self._snapshot_refetched and snapshot is not slept_on:
                        too_soon = self._min_refetch_s - (now - snapshot.fetched_at)
                if too_soon <= 0:
                    if self._last_error is not None and now < self._retry_at:
                        raise RegistryUnreachable(self._last_error)
                    if self._running is None:
                        starting = self._running = _Fetch(
                            self._generation,
                            threading.Event(),
                            refetch=snapshot is not None and now - snapshot.fetched_at < max_age,
                        )
                        break
                    waiting = self._running
                    current = waiting.generation == self._generation
            if waiting is None:
                self._sleep(too_soon)
                slept_on = snapshot
                continue
            if not waiting.done.wait(max(0.0, give_up_at - time.monotonic())):
                raise RegistryUnreachable(
                    f"{self.tracking_uri}: no answer to the search within {self._wait_s:g} s"
                )
            if current:
                if waiting.snapshot is not None:
                    return waiting.snapshot
                raise RegistryUnreachable(waiting.error or f"{self.tracking_uri}: the search failed")
            # That fetch began before the latest invalidation: its answer may miss the change.
        return self._fetch_for(starting)

    def _fetch_for(self, running: _Fetch) -> Snapshot:
        started = time.perf_counter()
        try:
            models, requests = self._fetch(Deadline.after(self._deadline_s))
        except RegistryUnreachable as exc:
            with self._lock:
                self._failures += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (self._failures - 1))
                self._retry_at = self._clock() + delay
                self._last_error = running.error = str(exc)
            if self._on_fetch:
                self._on_fetch(time.perf_counter() - started, False)
            raise
        else:
            snapshot = Snapshot(models=models, fetched_at=self._clock(), requests=requests)
            with self._lock:
                self._failures, self._last_error = 0, None
                self._snapshot = running.snapshot = snapshot
                self._snapshot_generation = running.generation
                self._snapshot_refetched = running.refetch
            if self._on_fetch:
                self._on_fetch(time.perf_counter() - started, True)
            return snapshot
        finally:
            with self._lock:
                self._running = None
            running.done.set()

    def _fetch(self, deadline: Deadline) -> tuple[dict[str, ModelEntry], int]:
        models: dict[str, ModelEntry] = {}
        token: str | None = None
        budget = self._max_pass_bytes
        auth = self._credentials.registry_auth
        uri = self.tracking_uri
        with auth.client(uri, self._transport) as client:
            for page in range(1, self._max_pages + 1):
                params: dict[str, Any] = {"max_results": PAGE_SIZE}
                if token:
                    params["page_token"] = token
                try:
                    answer = bounded_request(
                        client,
                        "GET",
                        SEARCH_PATH,
                        label=f"{uri}: search",
                        deadline=deadline,
                        max_bytes=SEARCH_PAGE_MAX_BYTES,
                        params=params,
                    )
                except mlmodel.Unreachable as exc:
                    raise RegistryUnreachable(str(exc)) from exc
                budget -= len(answer.content)
                if budget < 0:
                    raise RegistryUnreachable(
                        f"{uri}: search answers of one pass longer than {self._max_pass_bytes} bytes"
                    )
                if answer.status_code != 200:
                    # Never echo the body: an auth proxy may reflect headers.
                    raise RegistryUnreachable(
                        f"{uri}: search answered HTTP {answer.status_code}{redirect_note(answer.status_code)}"
                    )
                try:
                    body = answer.json()
                    models.update(parse_search_page(body))
                    token = next_page_token(body)
                except MalformedAnswer as exc:
                    raise RegistryUnreachable(
                        f"{uri}: search answered no MLflow search page ({exc})"
                    ) from exc
                except ValueError as exc:  # a login page, an error page of a proxy in front
                    raise RegistryUnreachable(f"{uri}: search answered no JSON") from exc
                # Only the small entries stay: the raw page goes before the next one is read.
                del answer, body
                if not token:
                    return models, page
        raise RegistryUnreachable(f"{uri}: search answered more than {self._max_pages} pages")


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
        deadline_s: float = SEARCH_DEADLINE_S,
        poll_wait_s: float | None = None,
        max_pages: int = MAX_SEARCH_PAGES,
        max_pollers: int = MAX_POLLERS,
        min_refetch_s: float = MIN_REFETCH_S,
        sleep: Callable[[float], None] = time.sleep,
        reads_outside_proxy: bool = True,
    ) -> None:
        """`deadline_s` bounds each call to a registry (a search pass, a version's facts, a tag write
        within TAG_TIMEOUT_S at most); `poll_wait_s` how long a caller waits for a search another
        one started (default: as long as the search may take). `reads_outside_proxy`: whether a
        version whose artifacts are not behind the tracking server's artifact proxy is read with the
        mlflow client (from the operator's network, with the resource's keys), or refused."""
        self._transport = transport
        self._reads_outside_proxy = reads_outside_proxy
        self._deadline_s = deadline_s
        self._poll_wait_s = poll_wait_s
        self._max_pages = max_pages
        self._clock = clock
        self._fetch_facts = fetch_facts or self._fetch_facts_over_rest
        self._max_pollers = max_pollers
        self._min_refetch_s = min_refetch_s
        self._sleep = sleep
        # Least recently used first; each with when it was last asked for (self._clock).
        self._pollers: OrderedDict[tuple[str, str], tuple[Poller, float]] = OrderedDict()
        self._shared: dict[tuple[bool | str, int], tuple[SharedTransport, float]] = {}
        self._swept_at = clock()
        self._shared_lock = threading.Lock()
        self._facts: OrderedDict[tuple[str, str, str, str], ModelFacts] = OrderedDict()
        self._facts_cache_size = facts_cache_size
        self._lock = threading.Lock()
        self._on_poll = on_poll

    def poller(self, tracking_uri: str, credentials: Credentials) -> Poller:
        key = (tracking_uri.rstrip("/"), credentials.fingerprint)
        with self._lock:
            now = self._clock()
            found = self._pollers.get(key)
            poller = found[0] if found is not None else None
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
                    deadline_s=self._deadline_s,
                    wait_s=self._poll_wait_s,
                    max_pages=self._max_pages,
                    min_refetch_s=self._min_refetch_s,
                    sleep=self._sleep,
                )
            self._pollers[key] = (poller, now)
            self._pollers.move_to_end(key)
            while len(self._pollers) > self._max_pollers:
                self._pollers.popitem(last=False)
            # A sweep at most once a SWEEP_INTERVAL_S keeps the common access O(1).
            sweep = now - self._swept_at >= SWEEP_INTERVAL_S
            if sweep:
                self._swept_at = now
                self._drop_idle_pollers(now)
        if sweep:
            self._drop_idle_transports(now)
        return poller

    def _drop_idle_pollers(self, now: float) -> None:
        """(lock held) A poller in use is asked for at every poll of its resources; one not asked for
        over POLLER_IDLE_S and 10 of its poll intervals serves nobody any more."""
        for key, (poller, used_at) in list(self._pollers.items()):
            if now - used_at > max(POLLER_IDLE_S, POLLER_IDLE_POLLS * poller.longest_max_age):
                del self._pollers[key]

    def _drop_idle_transports(self, now: float) -> None:
        """Shared transports no kept poller holds and not handed out for POLLER_IDLE_S (a request is
        over within its deadline, far sooner): a rotated CA bundle leaves its old one behind."""
        with self._lock:
            held = {id(poller.transport) for poller, _ in self._pollers.values()}
        with self._shared_lock:
            idle = [
                key
                for key, (transport, used_at) in self._shared.items()
                if id(transport) not in held and now - used_at > POLLER_IDLE_S
            ]
            dropped = [self._shared.pop(key)[0] for key in idle]
        for transport in dropped:
            transport.shutdown()

    def resolve(
        self, tracking_uri: str, credentials: Credentials, selector: ModelSelector, max_age: float
    ) -> str:
        if selector.version:
            # Nothing to poll; reading its facts (cached once found) proves the version exists.
            self.facts(tracking_uri, credentials, selector.name, selector.version)
            return selector.version
        return resolve_in(self.poller(tracking_uri, credentials).snapshot(max_age), selector)

    def promoted(
        self, tracking_uri: str, credentials: Credentials, name: str, max_age: float
    ) -> frozenset[str]:
        entry = self.poller(tracking_uri, credentials).snapshot(max_age).models.get(name)
        if entry is None:
            return frozenset()
        return promoted_versions(entry.aliases.values(), entry.stages.items())

    def facts(self, tracking_uri: str, credentials: Credentials, name: str, version: str) -> ModelFacts:
        # Keyed by the credentials too: facts read with one tenant's keys never answer another's.
        key = (tracking_uri.rstrip("/"), credentials.fingerprint, name, version)
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
        deadline = Deadline.after(min(TAG_TIMEOUT_S, self._deadline_s))
        with credentials.registry_auth.client(tracking_uri, self._transport_for(credentials)) as client:
            try:
                response = bounded_request(
                    client,
                    "DELETE" if value is None else "POST",
                    DELETE_TAG_PATH if value is None else SET_TAG_PATH,
                    label=f"{tracking_uri}: tag write",
                    deadline=deadline,
                    body=body if value is None else {**body, "value": value},
                )
            except mlmodel.Unreachable as exc:
                raise RegistryUnreachable(str(exc)) from exc
        if response.status_code in (401, 403):
            raise RegistryRefused(
                f"{tracking_uri}: tag write on {name}/{version} refused (HTTP {response.status_code})"
            )
        if response.status_code == 404 or _does_not_exist(response):
            return  # the version (or the tag) is gone: nothing left to tag
        if response.status_code != 200:
            raise RegistryUnreachable(
                f"{tracking_uri}: tag write answered HTTP {response.status_code}"
                f"{redirect_note(response.status_code)}"
            )

    def log_window_metrics(
        self,
        tracking_uri: str,
        credentials: Credentials,
        run: VersionRunRef,
        metrics: Mapping[str, float],
        timestamp_ms: int,
        step: int,
    ) -> None:
        """One window's figures on the version's run, over MLflow's REST API with the resource's
        credentials (bounded per call like every other request)."""
        with credentials.registry_auth.client(tracking_uri, self._transport_for(credentials)) as client:
            rest = TrackingRest(client)
            try:
                experiment_id = rest.experiment_id(run.experiment, {RESOURCE_TAG: run.resource})
                found = version_run(rest, experiment_id, run.model, run.resource, run.version)
                rest.log_batch(found.run_id, metrics, timestamp_ms, step)
            except SinkRefused as exc:
                if exc.code in ("401", "403", "PERMISSION_DENIED", "UNAUTHENTICATED"):
                    raise RegistryRefused(
                        f"{tracking_uri}: metrics of version {run.version} refused"
                    ) from exc
                raise RegistryUnreachable(
                    f"{tracking_uri}: metrics of version {run.version}: {exc.code}"
                ) from exc
            except (mlmodel.Unreachable, httpx.HTTPError) as exc:
                raise RegistryUnreachable(
                    f"{tracking_uri}: metrics not logged ({type(exc).__name__})"
                ) from exc

    def close(self) -> None:
        with self._shared_lock:
            shared, self._shared = [transport for transport, _ in self._shared.values()], {}
        for transport in shared:
            transport.shutdown()

    def _transport_for(self, credentials: Credentials) -> httpx.BaseTransport:
        if self._transport is not None:
            return self._transport
        verify = credentials.registry_auth.verify()
        # A CA bundle mounted from a Secret can be rotated in place: a new file is a new transport.
        key = (verify, _modified_ns(verify) if isinstance(verify, str) else 0)
        with self._shared_lock:
            found = self._shared.get(key)
            transport = found[0] if found is not None else SharedTransport(verify=verify)
            self._shared[key] = (transport, self._clock())
            return transport

    def _fetch_facts_over_rest(
        self, tracking_uri: str, credentials: Credentials, name: str, version: str
    ) -> ModelFacts:
        return fetch_facts_over_rest(
            tracking_uri,
            credentials,
            name,
            version,
            transport=self._transport_for(credentials),
            deadline_s=self._deadline_s,
            reads_outside_proxy=self._reads_outside_proxy,
        )

    def model_changed(self, model_name: str) -> None:
        """A webhook said `model_name` changed somewhere: refetch the snapshots that know it.

        The delivery does not say which server sent it, so pollers that have never seen the model
        are refreshed too (a newly created model must show up)."""
        with self._lock:
            pollers = [poller for poller, _ in self._pollers.values()]
        for poller in pollers:
            poller.invalidate()


def _modified_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0  # httpx reports the missing bundle when the transport is built


def _does_not_exist(response: mlmodel.Answer) -> bool:
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
    deadline_s: float = mlmodel.READ_DEADLINE_S,
    reads_outside_proxy: bool = True,
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
            deadline_s=deadline_s,
        )
    if found is None:
        if not reads_outside_proxy:
            # The location is the registry's word: an s3 endpoint, an http store or another host could
            # point the operator at anything its network reaches.
            raise mlmodel.Unreadable(
                f"{mlmodel.models_uri(name, version)}: its artifacts are outside the tracking server's "
                "artifact proxy, and the cluster's policy lets the operator read them only through it "
                "(policy.allowArtifactReadsOutsideProxy)"
            )
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
            tracking_uri, name, version, credentials=credentials.env, with_requirements=True
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
