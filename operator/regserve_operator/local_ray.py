"""The Ray cluster local mode starts on this machine: the cluster's twin, on loopback, leaving no trace.

`regserve dev` starts one when no dashboard answers at the address it is given, and stops it on exit:

- **Ingress as on Kubernetes.** `haproxy` puts `RAY_SERVE_ENABLE_HA_PROXY=1` in the env of every Ray
  process, as the builders put it in the Ray pods' env (Ray reads it at import time, so it must be
  there when the processes start). Attached to a cluster someone else started, local mode cannot change
  its mode; it says so when the cluster runs another one. HAProxy's per-request metrics are off unless
  a resource asks for them (`serving.ingressMetrics`), as in the pods.
- **Loopback only.** `ray start` replaces a loopback `--node-ip-address` by the machine's external
  address unless the cluster is single-node (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which is what a
  local cluster is). With that, the GCS, raylet, workers and agents listen on 127.0.0.1, and the
  dashboard and Serve are bound there explicitly. Ray 2.60 hard-codes three listeners on every
  interface that no setting moves: HAProxy's stats and Prometheus ports and each Serve replica's
  inter-deployment gRPC port (`[::]:0`); `ALL_INTERFACES_IN_RAY` names them.
- **Several clusters per host.** Every port Ray would otherwise take at a fixed number (HAProxy's
  8404/9101, the fallback proxy's 8500, the client server's 10001, the agent's 52365, metrics
  44217/44227) is a free one, and HAProxy's files (fixed paths under /tmp/haproxy-serve by default)
  live in the cluster's own temp dir.
- **Token auth.** Ray runs an open dashboard otherwise (and an open dashboard runs anyone's code):
  the cluster starts with `RAY_AUTH_MODE=token` and a fresh random token, written to `auth_token` in
  the cluster's temp dir (mode 0600) and handed to the Ray processes in their env, never on a command
  line or in a log. Local mode sends it to the dashboard (`LocalCluster.auth_token`); `ray` commands
  reach the cluster with `RAY_AUTH_TOKEN_PATH=<temp dir>/auth_token`.
- **No trace.** The cluster's temp dir is its own, so `ray start` writes its address file
  (`ray_current_cluster`) there rather than in /tmp/ray, where a later plain `ray.init()` would find it
  and hang on a dead GCS. `ray start --block`, its daemons, the workers and the HAProxy Serve starts
  share the session `ray start` opens (workers and HAProxy leave its process group), so stopping that
  session stops exactly this cluster; other Ray clusters on the machine are left alone. When
  `regserve dev` dies without stopping it (SIGKILL, a crash), a watchdog (`sandbox/reaper.py`) stops
  that session and removes the temp dir.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Literal

import httpx

from regserve_operator.builders import HAPROXY_ENV, HAPROXY_METRICS_ENV
from regserve_operator.sandbox.processes import port_for_later, start, stop, wait_while_running
from regserve_operator.sandbox.reaper import Reaper
from regserve_operator.targets.local import ray_auth_token

log = logging.getLogger("regserve.dev")

IngressMode = Literal["proxy", "haproxy"]

# Listeners Ray 2.60 opens on every interface whatever it is told (process name prefix → what).
ALL_INTERFACES_IN_RAY = {
    "haproxy": "HAProxy's stats and Prometheus frontends (`bind *:<port>` in Ray's template)",
    "ray::ServeRepli": "a Serve replica's inter-deployment gRPC server (`[::]:0` in replica.py)",
}

TOKEN_FILE = "auth_token"

# How long an attached cluster is watched for its Serve proxy to appear, to tell its ingress mode.
ATTACHED_MODE_WATCH_S = 600.0


@dataclass(frozen=True)
class RayPorts:
    """Every port a local cluster listens on that Ray would otherwise take at a fixed number."""

    dashboard: int
    gcs: int = field(default_factory=port_for_later)
    client_server: int = field(default_factory=port_for_later)
    metrics_export: int = field(default_factory=port_for_later)
    dashboard_agent: int = field(default_factory=port_for_later)
    dashboard_metrics: int = field(default_factory=port_for_later)
    autoscaler_metrics: int = field(default_factory=port_for_later)
    haproxy_stats: int = field(default_factory=port_for_later)
    haproxy_metrics: int = field(default_factory=port_for_later)
    fallback_proxy_http: int = field(default_factory=port_for_later)
    fallback_proxy_grpc: int = field(default_factory=port_for_later)


def ray_environment(
    ingress_mode: IngressMode,
    ports: RayPorts,
    temp_dir: Path,
    *,
    auth_token: str,
    ingress_metrics: bool = False,
) -> dict[str, str]:
    """The env of the Ray processes of a local cluster (added to this process's env)."""
    # Short: HAProxy adds a 56-character node id below it and refuses socket paths over 97 characters.
    haproxy = temp_dir / "h"
    return {
        # Single-node: keeps the loopback node IP (see the module docstring).
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # Nothing to drain on a local cluster: stop in seconds, not half a minute.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        HAPROXY_ENV: "1" if ingress_mode == "haproxy" else "0",
        HAPROXY_METRICS_ENV: "1" if ingress_metrics else "0",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ports.haproxy_stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports.haproxy_metrics),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports.fallback_proxy_http),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports.fallback_proxy_grpc),
        "DASHBOARD_METRIC_PORT": str(ports.dashboard_metrics),
        "AUTOSCALER_METRIC_PORT": str(ports.autoscaler_metrics),
        # The serving code must be importable by Ray's workers: they inherit this environment.
        "PYTHONPATH": os.pathsep.join(filter(None, [*_source_roots(), os.environ.get("PYTHONPATH", "")])),
        "RAY_AUTH_MODE": "token",
        # The token itself, so that one in this process's env (inherited otherwise) cannot shadow it.
        "RAY_AUTH_TOKEN": auth_token,
        "RAY_AUTH_TOKEN_PATH": str(temp_dir / TOKEN_FILE),
    }


def write_auth_token(temp_dir: Path) -> str:
    """A fresh random token in `temp_dir`, readable by this user only (as Ray generates its own)."""
    token = secrets.token_hex(32)
    descriptor = os.open(temp_dir / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(token)
    return token


def ray_start_command(ports: RayPorts, *, num_cpus: int, temp_dir: Path) -> list[str]:
    return _ray_cli(
        "start", "--head", "--block", f"--num-cpus={num_cpus}", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}", f"--port={ports.gcs}", f"--dashboard-port={ports.dashboard}",
        f"--ray-client-server-port={ports.client_server}", f"--metrics-export-port={ports.metrics_export}",
        f"--dashboard-agent-listen-port={ports.dashboard_agent}",
    )  # fmt: skip


@dataclass
class LocalCluster:
    """A Ray cluster local mode runs against; `process` is set when this session started it."""

    dashboard_url: str
    ingress_mode: IngressMode | None = None
    process: Popen[bytes] | None = None
    ports: RayPorts | None = None
    temp_dir: Path | None = None
    # The dashboard token of a cluster this session started; None when attached (then
    # `ray_auth_token()` finds the cluster's own, as Ray's CLI would).
    auth_token: str | None = field(default=None, repr=False)
    reaper: Reaper | None = None

    def stop(self) -> None:
        """Stop what we started (nothing when attached) and remove its temp dir."""
        if self.process is not None:
            stop(self.process, timeout=60)
            self.process = None
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        if self.reaper is not None:  # nothing left for it to clean up
            self.reaper.close()
            self.reaper = None

    def token(self) -> str | None:
        """The token to send to this cluster's dashboard."""
        return self.auth_token or ray_auth_token()


def ensure_ray(
    dashboard_url: str,
    *,
    ingress_mode: IngressMode,
    num_cpus: int,
    log_dir: Path,
    ingress_metrics: bool = False,
) -> LocalCluster:
    """Attach to the Ray cluster whose dashboard answers at `dashboard_url`, or start one there."""
    answer = dashboard_status(dashboard_url)
    if answer == 200:
        watch_attached_mode(dashboard_url, ingress_mode)
        return LocalCluster(dashboard_url)
    if answer in (401, 403):
        raise SystemExit(
            f"the Ray dashboard at {dashboard_url} wants a token this process does not have: set "
            "RAY_AUTH_TOKEN_PATH to its token file (a cluster `regserve dev` started keeps it in "
            f"<its temp dir>/{TOKEN_FILE}), or pass another --dashboard"
        )
    return start_cluster(
        dashboard_url,
        ingress_mode=ingress_mode,
        num_cpus=num_cpus,
        log_dir=log_dir,
        ingress_metrics=ingress_metrics,
    )


def start_cluster(
    dashboard_url: str,
    *,
    ingress_mode: IngressMode,
    num_cpus: int,
    log_dir: Path,
    ingress_metrics: bool = False,
) -> LocalCluster:
    url = httpx.URL(dashboard_url)
    if url.host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"regserve dev starts Ray on loopback only; {dashboard_url} is not (use 127.0.0.1)")
    ports = RayPorts(dashboard=url.port or 8265)
    # Short and under /tmp: Ray's and HAProxy's unix sockets live below it (see ray_environment).
    temp_dir = Path(tempfile.mkdtemp(prefix="rgs-", dir="/tmp"))
    print(f"regserve: starting a local Ray cluster ({ingress_mode} ingress) at {dashboard_url}", flush=True)
    reaper: Reaper | None = None
    process: Popen[bytes] | None = None
    try:
        # First, so that nothing started below can outlive this process, however it ends.
        reaper = Reaper.start(log_dir / "reaper.log")
        reaper.remove_dir(temp_dir)
        token = write_auth_token(temp_dir)
        log_path = log_dir / "ray-start.log"
        process = start(
            ray_start_command(ports, num_cpus=num_cpus, temp_dir=temp_dir),
            log=log_path,
            env=ray_environment(
                ingress_mode, ports, temp_dir, ingress_metrics=ingress_metrics, auth_token=token
            ),
        )
        reaper.stop_session(process.pid)  # `start` made it a session leader: its pid is the session id
        wait_while_running(
            process,
            lambda: dashboard_up(dashboard_url, token=token),
            log=log_path,
            what=f"`ray start` (dashboard {dashboard_url})",
            timeout=180,
            interval=0.5,
        )
    except BaseException:
        if process is not None:
            stop(process)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if reaper is not None:
            reaper.close()
        raise
    return LocalCluster(
        dashboard_url, ingress_mode, process, ports, temp_dir, auth_token=token, reaper=reaper
    )


def wanted_ingress_mode(modes: Iterable[IngressMode]) -> IngressMode:
    """One cluster serves every resource: HAProxy unless a resource asks for the Python proxy."""
    chosen = set(modes)
    if len(chosen) > 1:
        log.warning(
            "resources ask for different ingress modes (%s); one local cluster has one: using proxy",
            ", ".join(sorted(chosen)),
        )
    return "proxy" if "proxy" in chosen else "haproxy"


def dashboard_up(url: str, *, token: str | None = None) -> bool:
    return dashboard_status(url, token=token) == 200


def dashboard_status(url: str, *, token: str | None = None) -> int | None:
    """The dashboard's answer to a Serve read (401/403: it wants another token), None if none answers."""
    try:
        with _dashboard(url, token) as http:
            return http.get("/api/serve/applications/").status_code
    except httpx.HTTPError:
        return None


# ------------------------------------------------------------------------------- attached clusters


def cluster_ingress_mode(dashboard_url: str) -> IngressMode | None:
    """The ingress mode of a running cluster, from the class of its Serve proxy actors (None until
    Serve has started one)."""
    with _dashboard(dashboard_url) as http:
        proxies = (http.get("/api/serve/applications/").json().get("proxies") or {}).values()
        actor_ids = [p["actor_id"] for p in proxies if p.get("actor_id")]
        if not actor_ids:
            return None
        query = {"filter_keys": "actor_id", "filter_predicates": "=", "filter_values": actor_ids[0]}
        actors = http.get("/api/v0/actors", params=query).json()["data"]["result"]["result"]
    classes = {actor.get("class_name") for actor in actors}
    return "haproxy" if "HAProxyManager" in classes else "proxy"


def watch_attached_mode(dashboard_url: str, wanted: IngressMode) -> None:
    """Say when the cluster we attached to serves with another ingress mode than the resources ask for.

    A cluster whose Serve has not started yet shows its mode only once the first application is
    deployed, so the check runs on a thread of its own until the proxy appears."""
    thread = threading.Thread(
        target=_report_attached_mode, args=(dashboard_url, wanted), name="regserve-ingress-check", daemon=True
    )
    thread.start()


def _report_attached_mode(dashboard_url: str, wanted: IngressMode) -> None:
    deadline = time.monotonic() + ATTACHED_MODE_WATCH_S
    while time.monotonic() < deadline:
        try:
            mode = cluster_ingress_mode(dashboard_url)
        except (httpx.HTTPError, ValueError, KeyError):
            mode = None
        if mode is not None:
            _say_attached_mode(dashboard_url, mode, wanted)
            return
        time.sleep(1.0)


def _say_attached_mode(dashboard_url: str, mode: IngressMode, wanted: IngressMode) -> None:
    if mode == wanted:
        log.info("attached to the Ray cluster at %s (%s ingress)", dashboard_url, mode)
        return
    log.warning(
        "the Ray cluster at %s serves with %s ingress, not %s as the resources ask: local mode uses the "
        "cluster as it is (its mode is set by its Ray processes' env when they start; stop it to let "
        "regserve dev start one in %s mode)",
        dashboard_url,
        mode,
        wanted,
        wanted,
    )


# ----------------------------------------------------------------------------------------- helpers


def _dashboard(url: str, token: str | None = None) -> httpx.Client:
    token = token or ray_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=5)


def _ray_cli(*args: str) -> list[str]:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray") or "ray"
    return [ray, *args]


def _source_roots() -> list[str]:
    here = Path(__file__).resolve().parent
    return [str(here.parent), str(here.parent.parent)]
