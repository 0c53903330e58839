"""The registry port: what the operator asks MLflow, and how often.

Two kinds of questions, answered differently:

- "Which version does each selector point at?" is asked for every resource at every poll. It is
  answered from one shared snapshot per tracking server (and credentials): a paged
  `registered-models/search` pass whose results carry each model's aliases and latest version per
  stage. However many resources watch a server, it costs the same requests per interval.
- "What is version N?" (signature, flavors, size, requirements) is asked once per version: registry
  versions are immutable, so the answer is cached. It is answered over MLflow's REST API too (the
  version's artifact location, then `MLmodel` and `requirements.txt` through the server's artifact
  proxy), so the operator never imports mlflow when artifacts are behind that proxy; other stores
  take the mlflow client, imported only then (see `fetch_facts_over_rest`).

Credentials come from the Secret a resource names, as environment-variable-style keys
(MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*...). They are never logged: the
`Credentials` repr shows key names only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from regserve_operator.ports import Credentials, ModelFacts, NotFound, RegistryError, RegistryUnreachable
from regserve_operator.spec import ModelSelector
from serving_app.compat import Signature, check_signature

log = logging.getLogger(__name__)

SEARCH_PATH = "/api/2.0/mlflow/registered-models/search"
DOWNLOAD_URI_PATH = "/api/2.0/mlflow/model-versions/get-download-uri"
ARTIFACTS_PATH = "/api/2.0/mlflow-artifacts/artifacts"
PAGE_SIZE = 1000
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
        creds = self._credentials
        with httpx.Client(
            base_url=self.tracking_uri,
            headers=creds.headers(),
            auth=creds.auth(),
            verify=creds.verify(),
            transport=self._transport,
            timeout=httpx.Timeout(10.0),
        ) as client:
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
        facts_cache_size: int = 512,
        on_poll: Callable[[str, float, bool], None] | None = None,
    ) -> None:
        self._transport = transport
        self._clock = clock
        self._fetch_facts = fetch_facts or functools.partial(fetch_facts_over_rest, transport=transport)
        self._pollers: dict[tuple[str, str], Poller] = {}
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
                    tracking_uri, credentials, transport=self._transport, clock=self._clock, on_fetch=on_fetch
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

    def model_changed(self, model_name: str) -> None:
        """A webhook said `model_name` changed somewhere: refetch the snapshots that know it.

        The delivery does not say which server sent it, so pollers that have never seen the model
        are refreshed too (a newly created model must show up)."""
        with self._lock:
            pollers = list(self._pollers.values())
        for poller in pollers:
            poller.invalidate()


# ------------------------------------------------------------------------------------ MLmodel facts

# Error codes with which MLflow says "no such thing" (INVALID_PARAMETER_VALUE: e.g. a version that is
# not a number); anything else it answers is a failure to answer.
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"})
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def fetch_facts_over_rest(
    tracking_uri: str,
    credentials: Credentials,
    name: str,
    version: str,
    *,
    transport: httpx.BaseTransport | None = None,
) -> ModelFacts:
    """A version's facts from its MLmodel and requirements.txt, read over MLflow's REST API.

    The server says where the version's artifacts are (`get-download-uri`, which resolves MLflow 3's
    `models:/m-<id>` logged-model sources). When that is `mlflow-artifacts:` on this server (the
    default for `mlflow server`, which proxies its artifact store), both files come through the
    proxy: three requests, no mlflow import. Any other location (s3://, gs://, wasbs://, runs:/, http
    artifact servers, file paths, a proxy on another host) is read by the mlflow client with the
    store's own client libraries and credentials, imported only for it: users of those stores keep
    working, and pay for mlflow in the operator's memory.
    """
    base = tracking_uri.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return fetch_facts_with_mlflow(tracking_uri, credentials, name, version)
    uri = f"models:/{name}/{version}"
    with _client(base, credentials, transport) as client:
        response = _get(client, credentials, uri, DOWNLOAD_URI_PATH, {"name": name, "version": version})
        try:
            location = str(response.json().get("artifact_uri") or "")
        except (ValueError, AttributeError) as exc:
            # Something between us and MLflow (a login page?) answered 200: not the registry's answer.
            raise RegistryUnreachable(f"{uri}: get-download-uri answered no MLflow JSON") from exc
        path = _proxied_path(location, base)
        if path is not None:
            mlmodel = _get(client, credentials, uri, f"{ARTIFACTS_PATH}{path}/MLmodel").text
            requirements: tuple[str, ...] = ()
            # As before: requirements are advisory (an image-pin check); a version without them is fine.
            with contextlib.suppress(httpx.HTTPError):
                answer = client.get(f"{ARTIFACTS_PATH}{path}/requirements.txt")
                if answer.status_code == 200:
                    requirements = _requirements(answer.text.splitlines())
            return facts_from_mlmodel(name, version, mlmodel, requirements)
    scheme = urllib.parse.urlparse(location).scheme or "file"
    log.debug("%s: artifacts in a %r store: reading them with the mlflow client", uri, scheme)
    return fetch_facts_with_mlflow(tracking_uri, credentials, name, version)


def facts_from_mlmodel(name: str, version: str, text: str, requirements: tuple[str, ...] = ()) -> ModelFacts:
    """Facts from an MLmodel file's text. Raises ValueError or yaml.YAMLError for a file that is not
    a readable MLmodel (not a RegistryError: the registry answered, and reconcile holds the version)."""
    mlmodel = yaml.load(text, Loader=_YAML_LOADER)
    if not isinstance(mlmodel, dict):
        raise ValueError("MLmodel is not a YAML mapping")
    signature = mlmodel.get("signature")
    if signature is not None and not isinstance(signature, dict):
        raise ValueError("MLmodel signature is not a mapping")
    check_signature(signature)
    size = mlmodel.get("model_size_bytes")
    return ModelFacts(
        name=name,
        version=version,
        signature=signature,
        flavors=tuple(sorted(mlmodel.get("flavors") or {})),
        model_size_bytes=int(size) if size is not None else None,
        requirements=requirements,
    )


def _client(base: str, credentials: Credentials, transport: httpx.BaseTransport | None) -> httpx.Client:
    return httpx.Client(
        base_url=base,
        headers=credentials.headers(),
        auth=credentials.auth(),
        verify=credentials.verify(),
        transport=transport,
        timeout=httpx.Timeout(10.0),
    )


def _get(
    client: httpx.Client,
    credentials: Credentials,
    uri: str,
    path: str,
    params: Mapping[str, str] | None = None,
) -> httpx.Response:
    try:
        response = client.get(path, params=params)
    except httpx.HTTPError as exc:
        raise RegistryUnreachable(f"{uri}: {type(exc).__name__}") from exc
    if response.status_code == 200:
        return response
    code, message = _mlflow_error(response)
    if code in _NOT_FOUND_CODES:
        # MLflow's own sentence ("Model Version (name=m, version=9) not found"), scrubbed all the same.
        raise NotFound(credentials.scrub(f"{uri}: {message or code}")[:300])
    # Never echo other bodies: an auth proxy may reflect headers.
    raise RegistryUnreachable(f"{uri}: {path.rsplit('/', 1)[-1]} answered HTTP {response.status_code}")


def _mlflow_error(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return "", ""
    if not isinstance(body, dict):
        return "", ""
    return str(body.get("error_code") or ""), str(body.get("message") or "")


def _proxied_path(location: str, base: str) -> str | None:
    """The URL-quoted artifact path under ARTIFACTS_PATH when `location` is behind this server's
    artifact proxy; None otherwise. A proxy on another host (`mlflow-artifacts://host/...`) is left to
    the mlflow client: this server's credentials do not go to other hosts from here."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme != "mlflow-artifacts":
        return None
    if parsed.netloc and parsed.netloc.lower() != urllib.parse.urlparse(base).netloc.lower():
        return None
    path = parsed.path.strip("/")
    return "/" + urllib.parse.quote(path) if path else ""


def _requirements(lines: list[str]) -> tuple[str, ...]:
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith(("#", "-")))


# mlflow reads credentials from the process environment only; requests that need different ones
# take turns. Facts are fetched once per version, so the lock is rarely contended.
_ENV_LOCK = threading.Lock()


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield
        finally:
            for key, old in saved.items():
                if old is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = old


def fetch_facts_with_mlflow(
    tracking_uri: str, credentials: Credentials, name: str, version: str
) -> ModelFacts:
    """Downloads only the version's MLmodel (and requirements.txt) to a temp dir with the mlflow client.

    For artifact stores the REST path cannot read. mlflow (and the store's client library, e.g. boto3)
    is imported here and nowhere else in the operator."""
    uri = f"models:/{name}/{version}"
    try:
        import mlflow
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError as exc:
        raise RegistryUnreachable(
            f"{uri}: its artifacts are outside the tracking server's artifact proxy, and reading them "
            "needs the mlflow package (plus the store's client library), which is not installed here"
        ) from exc

    # MLflow 3.17 resolves `models:/` URIs with a default client, ignoring download_artifacts'
    # tracking_uri/registry_uri: point the process-wide defaults at this server for the call.
    server = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    with (
        _env({**credentials.env, **server}),
        _use_tracking_uri(tracking_uri),
        tempfile.TemporaryDirectory(prefix="regserve-mlmodel-") as tmp,
    ):
        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri}/MLmodel",
                dst_path=tmp,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        except MlflowException as exc:
            code = getattr(exc, "error_code", "")
            if code in _NOT_FOUND_CODES:
                raise NotFound(credentials.scrub(f"{uri}: {exc.message}")) from exc
            raise RegistryUnreachable(f"{uri}: {code or type(exc).__name__}") from exc
        except OSError as exc:
            raise RegistryUnreachable(f"{uri}: {type(exc).__name__}") from exc
        model = Model.load(path)
        requirements: tuple[str, ...] = ()
        with contextlib.suppress(Exception):
            req_path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{uri}/requirements.txt",
                dst_path=os.path.join(tmp, "req"),
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
            with open(req_path) as handle:
                requirements = _requirements(handle.readlines())
    return ModelFacts(
        name=name,
        version=version,
        signature=model.signature.to_dict() if model.signature is not None else None,
        flavors=tuple(sorted(model.flavors)),
        model_size_bytes=model.model_size_bytes,
        requirements=requirements,
    )


@dataclass
class RequirementCheck:
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def check_requirements(requirements: tuple[str, ...], image_pins: Mapping[str, str]) -> RequirementCheck:
    """Compare a version's `name==x` pins with the serving image's; unknown packages are not judged."""
    check = RequirementCheck()
    for line in requirements:
        spec = line.split(";")[0].strip()
        if "==" not in spec:
            continue
        pkg, _, wanted = spec.partition("==")
        pkg = pkg.split("[")[0].strip().lower().replace("_", "-")
        have = image_pins.get(pkg)
        if have is not None and have != wanted.strip():
            check.mismatches.append(f"{pkg}=={wanted.strip()} (image has {have})")
    return check
