"""`serving_app.app:build_app` — the Ray Serve application serving one registered model.

`ModelServer` is a module-level deployment and `build_app` a typed builder over it: it takes `AppArgs`
or a dict of its fields (what Ray's config path and Python callers hand over), validated by `AppArgs`
either way. What the args size is set when a replica starts: the multiplexed LRU is
built in `__init__` (Ray 2.60 detects a multiplexed loader stored on the instance), and so is the
batcher (`serving_app.batcher`); `max_ongoing_requests` goes through `.options()`.
Requests arrive at `__call__` and are routed by `serving_app.routes` (no FastAPI on the request path).
No `from __future__ import annotations` here: Ray reads the builder's annotation at runtime (a union,
so Ray passes the dict through and `config.app_args` validates it).
"""

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import Response
from mlflow.exceptions import MlflowException
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from serving_app import http, routes
from serving_app.batcher import MicroBatcher
from serving_app.board import BoardClient
from serving_app.config import (
    DEPLOYMENT_NAME,
    AppArgs,
    app_args,
    candidate_generation,
    max_ongoing_requests,
    parse_user_config,
    pinning_error,
)
from serving_app.convert import normalise_records, records_to_model_input
from serving_app.counters import ReplicaCounters, rollout_report
from serving_app.errors import InvalidInput, ServingError
from serving_app.invocations import enforce_signature, parse_invocation
from serving_app.metrics import ServingMetrics
from serving_app.mlmodel import RegistryAuth
from serving_app.monitoring.monitor import replica_monitor
from serving_app.monitoring.records import REQUEST_ID_HEADER
from serving_app.oip.handlers import OipHandlers
from serving_app.registry import LoadedVersion, ModelRegistry, configure_process
from serving_app.replica_rollout import ReplicaRollout
from serving_app.rollout import RequestRollout
from serving_app.service import ModelService, PredictJob
from serving_app.timing import current_timer, step, stop_timing

logger = logging.getLogger("ray.serve")

# Routes that predict: the ones a rollout assigns and counts.
PREDICT_ROUTES = frozenset({"serve", "invocations", "v2_infer"})


def build_app(args: AppArgs | dict[str, Any]) -> Application:
    validated = app_args(args)
    # A Serve config's own `max_ongoing_requests` (the operator writes one) overrides this default.
    deployment = ModelServer.options(  # type: ignore[attr-defined]
        max_ongoing_requests=max_ongoing_requests(validated.max_batch_size)
    )
    return deployment.bind(validated)


def pinned_slots(args: AppArgs) -> int:
    """LRU slots for pinned versions: the default lives outside Ray's LRU so it is never evicted."""
    return max(1, args.max_models_per_replica - 1)


# Helpers come before the deployment: Ray pickles the class when the decorator runs, with the
# module globals defined by then.


def _query_params(request: Request, adapter: Any) -> dict[str, Any] | None:
    if adapter is None or not request.query_params:
        return None
    return adapter.validate_python(dict(request.query_params))


def _multiplexed(
    load: Callable[[str], Awaitable[LoadedVersion]], slots: int
) -> Callable[[str], Awaitable[LoadedVersion]]:
    """`load` behind Ray's multiplexed LRU of `slots` versions. Built per replica because the size
    comes from the args; wrapped in a plain function since Ray keeps its LRU as an attribute of the
    decorated callable (a bound method takes none)."""

    async def load_pinned(version: str) -> LoadedVersion:
        return await load(version)

    return serve.multiplexed(max_num_models_per_replica=slots)(load_pinned)


def _replica_identity() -> tuple[str, str]:
    """(application name, replica id); outside a Serve replica (tests) a stand-in."""
    try:
        context = serve.get_replica_context()
        return context.app_name, context.replica_id.unique_id
    except Exception:
        return "local", f"pid-{os.getpid()}"


def _auth_token(args: AppArgs) -> str | None:
    if args.auth_token_env is None:
        return None
    token = os.environ.get(args.auth_token_env)
    if not token:
        # Refuse to start open when auth was asked for: a missing Secret must not mean "no auth".
        raise RuntimeError(f"auth is on but the env var {args.auth_token_env} is empty or unset")
    return token


def without_free_text(report: dict[str, Any]) -> dict[str, Any]:
    """A `/rollout` report with codes only: the smoke test's message dropped."""
    smoke = report.get("smoke")
    if not isinstance(smoke, dict) or smoke.get("message") is None:
        return report
    return {**report, "smoke": {**smoke, "message": None}}


# What `/openapi.json` documents (with the default version's schemas filled in per request).
documented_routes = routes.openapi_app()

RouteHandler = Callable[[Request, str], Awaitable[Response]]


@serve.deployment(name=DEPLOYMENT_NAME, ray_actor_options={"num_cpus": 0.5})
class ModelServer:
    async def __init__(self, args: AppArgs) -> None:  # type: ignore[misc]
        self.args = args
        tracking_uri = configure_process(args.tracking_uri)
        self.token = _auth_token(args)
        self.metrics = ServingMetrics.create()
        self.pinned_versions: set[str] = set()
        self._load_pinned = _multiplexed(self._load_into_lru, pinned_slots(args))
        auth = RegistryAuth.from_environment(os.environ)
        registry = ModelRegistry(args.model_name, tracking_uri, auth)
        self.service = ModelService(args, registry, self._load_pinned, self.metrics)
        self.batcher: MicroBatcher[PredictJob] = MicroBatcher(
            self.service.predict_many,
            max_size=args.max_batch_size,
            wait_s=args.batch_wait_timeout_s,
            in_flight=lambda: self.service.in_flight,
        )
        self.oip = OipHandlers(args, self.service, self._predict, lambda: sorted(self.pinned_versions))
        app_name, replica_id = _replica_identity()
        self.counters = ReplicaCounters(replica_id)
        self.rollout = ReplicaRollout(self.service, self.counters, self.metrics)
        self.board = BoardClient(app_name, self.counters)
        self._board_pusher = asyncio.get_running_loop().create_task(self.board.run())
        self.monitor = replica_monitor(
            args.monitoring,
            model=args.model_name,
            tracking_uri=tracking_uri,
            replica_id=replica_id,
            metrics=self.metrics,
            board=self.board,
        )
        if self.monitor is not None:
            self.rollout.monitor = self.monitor
            self.monitor.start()
        self._routes: dict[str, RouteHandler] = {
            route.handler: getattr(self, route.handler) for route in routes.ROUTES
        }
        if args.default_version:
            await self.service.set_default(args.default_version)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config, candidate_error = parse_user_config(user_config)
        version = config.default_version or self.args.default_version
        if version is None:
            raise ValueError("no default version: set args.default_version or user_config.default_version")
        if problem := pinning_error(user_config):
            logger.error("%s; every pinned request is refused until a valid policy arrives", problem)
        # First: a version the operator just held is refused even while the default switch loads.
        self.service.set_pin_policy(config.pinning.policy())
        await self.service.set_default(version)
        # After the default: a candidate never holds up (or fails) the default's switch.
        await self.rollout.apply(
            config.candidate, candidate_error, error_generation=candidate_generation(user_config)
        )
        try:
            await self.board.push()  # the smoke result, without waiting for the next push
        except Exception as error:
            logger.warning("rollout board push failed: %s", error)

    async def _load_into_lru(self, version: str) -> LoadedVersion:
        loaded = await self.service.load_for_multiplexer(version)
        self.pinned_versions.add(version)
        count_eviction = loaded.on_release

        def released() -> None:
            self.pinned_versions.discard(version)
            if count_eviction is not None:
                count_eviction()

        loaded.on_release = released
        return loaded

    async def _predict(self, job: PredictJob) -> list[Any]:
        return await self.rollout.predict(job, self._predict_stable)

    async def _predict_stable(self, job: PredictJob) -> list[Any]:
        # Timed here, in the request's own task: the batcher sends batches from a task of its own.
        with step("predict"):
            # One turn of the loop first: requests that arrived meanwhile reach this point too (light
            # models predict on the loop, so nothing else would suspend this request before it does).
            # Taken without batching as well: c=1 requests are a few percent faster with it (bench.serving
            # shows it), though which part of Serve's request path gains is not known.
            await asyncio.sleep(0)
            # Batch only when others are waiting: a lone request must not sit out the batch timeout.
            others_waiting = self.args.batching and self.service.in_flight > 1
            if others_waiting:
                result = await self.batcher.submit(job)
            else:
                result = (await self.service.predict_many([job]))[0]
        if isinstance(result, ServingError):
            raise result
        return result

    # ------------------------------------------------------------------------------- routes

    async def __call__(self, request: Request) -> Response:
        found = routes.match(request.method, routes.route_path(request.scope))
        if isinstance(found, routes.Refused):
            allow = {"Allow": found.allow} if found.allow else None
            return http.json_response(found.body, status_code=found.status_code, headers=allow)
        return await self._routes[found.route.handler](request, found.rest)

    async def serve_records(self, request: Request, _rest: str) -> Response:
        return await self._answer(request, "serve", self._serve_records)

    async def invocations(self, request: Request, _rest: str) -> Response:
        return await self._answer(request, "invocations", self._invocations)

    async def open_inference(self, request: Request, rest: str) -> Response:
        return await self.oip.answer(request, rest, self._answer)

    async def healthz(self, _request: Request, _rest: str) -> Response:
        health = self.service.health()
        if self.monitor is not None:
            health["payloads"] = self.monitor.health()
        return http.json_response(health, status_code=200 if self.service.ready else 503)

    async def ping(self, _request: Request, _rest: str) -> Response:
        # Open like /healthz (Kubernetes probes and MLflow's client send no token; the body is a
        # newline). Reads the state only: the default's load is started by __init__/reconfigure, so
        # a ping never loads, predicts or waits.
        return http.scoring_ping(self.service.ready)

    async def mlflow_version(self, request: Request, _rest: str) -> Response:
        # With auth on, the software version is for callers with the token, as /metadata is.
        if denied := self._denied(request):
            return denied
        return http.scoring_version()

    async def rollout_report(self, _request: Request, _rest: str) -> Response:
        # Open like /healthz (the operator reads it): figures and stable codes. The smoke test's message
        # quotes the model's own error, so with auth on it is left out (its code stays).
        try:
            report = await self.board.report()
        except Exception as error:
            logger.warning("rollout board unavailable, answering this replica's figures: %s", error)
            report = {**rollout_report([self.counters.snapshot()]), "partial": True}
        if self.token is not None:
            report = without_free_text(report)
        return http.json_response(report)

    async def monitoring_report(self, _request: Request, _rest: str) -> Response:
        # Open like /rollout (the operator reads it): counts, latency buckets, PSI per feature name.
        if self.monitor is None:
            return http.json_response({"enabled": False})
        return http.json_response({"enabled": True, **await self.monitor.report()})

    async def metadata(self, request: Request, _rest: str) -> Response:
        if denied := self._denied(request):
            return denied
        return http.json_response(self.service.metadata(sorted(self.pinned_versions)))

    async def openapi(self, request: Request, _rest: str) -> Response:
        # The document is the signature: with auth on, only callers with the token read it.
        if denied := self._denied(request):
            return denied
        default = self.service.default
        document = http.build_openapi(
            documented_routes,
            default.api,
            title=f"{self.args.model_name} (regserve)",
            version=default.version,
            root_path=request.scope.get("root_path", ""),
        )
        return http.json_response(document)

    async def docs(self, request: Request, _rest: str) -> Response:
        if denied := self._denied(request):
            return denied
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{self.args.model_name} — docs")

    def _denied(self, request: Request) -> Response | None:
        try:
            http.check_token(request, self.token)
        except ServingError as error:
            return http.error_response(error, retry_after_s=self.args.registry_retry_after_s)
        return None

    async def __del__(self) -> None:
        # Serve calls this on a graceful shutdown: what is queued is written once more.
        if self.monitor is not None:
            await self.monitor.stop()

    async def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("no default version loaded")

    # ----------------------------------------------------------------------------- handlers

    async def _answer(
        self, request: Request, route: str, handler: Callable[[Request], Awaitable[tuple[Any, str]]]
    ) -> Response:
        started = time.perf_counter()
        version = "none"
        stop_timing()  # a request that loads a version starts its own timer (`service.resolve`)
        state = self._assign(request, route)
        echo_id, capture = None, None
        if self.monitor is not None and state is not None:
            # Ray's proxy gives every request an id (the client's `X-Request-Id` or its own) and echoes
            # it; one arriving without (another ingress) gets ours, echoed here.
            sent_id = request.headers.get(REQUEST_ID_HEADER)
            capture = state.payload = self.monitor.begin(sent_id, route)
            echo_id = capture.request_id if sent_id is None else None
        self.service.in_flight += 1
        try:
            http.check_token(request, self.token)
            payload, version = await handler(request)
            # A handler answering in another encoding (the Open Inference Protocol's binary tensors)
            # hands back its own Response.
            if isinstance(payload, Response):
                response = payload
            else:
                response = http.json_response(payload, headers={"X-Model-Version": version})
        except ServingError as error:
            if capture is not None:
                capture.error_code = error.code
            error = http.with_error_id(error)
            if not self.args.expose_schema_in_errors:
                http.redact(error)
            response = http.error_response(error, retry_after_s=self.args.registry_retry_after_s)
        except Exception as error:  # never let one request take the replica down
            if capture is not None:
                capture.error_code = "internal_error"
            response = http.internal_error(error)
        finally:
            self.service.in_flight -= 1
            self.batcher.request_finished()
        timer = current_timer()
        if timer is not None:
            timer.steps.append(("total", (time.perf_counter() - started) * 1000))
            response.headers["Server-Timing"] = timer.header()
        if state is not None:
            self._finish(state, response, started)
        if echo_id is not None:
            response.headers[REQUEST_ID_HEADER] = echo_id
        if capture is not None and state is not None and self.monitor is not None:
            self.monitor.finish(
                capture,
                version=state.version,
                choice=state.choice,
                status=response.status_code,
                latency_ms=(time.perf_counter() - started) * 1000,
            )
        self.metrics.requests.inc(
            tags={"route": route, "version": version, "status": str(response.status_code)}
        )
        self.metrics.latency.observe(
            (time.perf_counter() - started) * 1000, tags={"route": route, "version": version}
        )
        return response

    def _assign(self, request: Request, route: str) -> RequestRollout | None:
        """The request's part in a rollout (prediction routes only), visible to `service.resolve`
        through the request's own context."""
        if route not in PREDICT_ROUTES:
            return None
        state = self.rollout.begin(
            pinned=http.requested_version(request) is not None, sticky=request.headers.get
        )
        self.service.request_rollout.set(state)
        return state

    def _finish(self, state: RequestRollout, response: Response, started: float) -> None:
        if state.version is not None and "X-Model-Version" not in response.headers:
            response.headers["X-Model-Version"] = state.version  # errors name the version too
        self.rollout.finish(state, response.status_code, (time.perf_counter() - started) * 1000)

    async def _serve_records(self, request: Request) -> tuple[Any, str]:
        http.require_json(request)
        body = await http.read_body(request, self.args.max_body_bytes)
        default = self.service.default
        loaded = await self.service.resolve(http.requested_version(request))
        try:
            payload = default.api.request_adapter.validate_json(body)
            params = _query_params(request, default.api.params_adapter)
        except ValidationError as error:
            raise http.validation_failure(error, expose_fields=self.args.expose_schema_in_errors) from None
        records = normalise_records(payload, default.api.input_shape)
        if not records:
            raise InvalidInput("the request holds no records")
        model_input = records_to_model_input(records, default.api.input_shape)
        try:
            # Here rather than in predict: once per request, and a refusal is the caller's error.
            model_input, params = enforce_signature(model_input, params, default.loaded)
        except MlflowException as error:
            raise self._invalid_input(error) from None
        job = PredictJob(loaded, model_input, len(records), params, default.loaded.signature)
        return await self._predict(job), loaded.version

    def _invalid_input(self, error: MlflowException) -> InvalidInput:
        message = error.message if self.args.expose_schema_in_errors else "request body is not valid input"
        return InvalidInput(message)

    async def _invocations(self, request: Request) -> tuple[Any, str]:
        body = await http.read_body(request, self.args.max_body_bytes)
        default = self.service.default
        loaded = await self.service.resolve(http.requested_version(request))
        try:
            parsed = parse_invocation(
                body,
                request.headers.get("content-type", "application/json"),
                default.loaded,
                default.api.fast_plan,
            )
        except MlflowException as error:
            raise self._invalid_input(error) from None
        enforced_for = default.loaded.signature if parsed.enforced else None
        job = PredictJob(loaded, parsed.data, parsed.rows, parsed.params, enforced_for)
        return {"predictions": await self._predict(job)}, loaded.version
