"""A small "process kubelet": runs the containers of pods KWOK holds, as host processes in pod namespaces.

For every pod on a KWOK node in the namespaces it serves, once KWOK has given the pod an address, the
runner makes what a kubelet and a CNI plugin would: a network namespace holding that address (a veth on
the plane's bridge, default route to it), the pod's own ``hosts``/``resolv.conf`` (``ip netns exec``
bind-mounts ``/etc/netns/NAME/*``) and a private ``/tmp`` (Ray and HAProxy use fixed paths there). It runs
init containers to completion, then each container's own command and args with its resolved environment,
in a process group of its own with a parent-death signal; it runs the readiness probes and writes the
pod's Ready condition and container statuses, and restarts a container that exits the way a kubelet
would (``restartCount``, ``lastState``, back-off). Every pod is told where the apiserver is
(``KUBERNETES_SERVICE_HOST``/``PORT``: the plane's bridge address), and a pod with a service account finds
a token bound to it and the cluster CA at ``/var/run/secrets/kubernetes.io/serviceaccount`` unless it
turns automounting off; a projected volume with a ``serviceAccountToken`` source is written the same way
and bind-mounted only into the containers that mount it (read-only, at a mount point that must exist on
the host, as the service-account one does), so in-cluster clients (KubeRay's autoscaler) work. When the
pod goes, everything in its namespace is killed and the namespace deleted. Pods are keyed by UID: KWOK
reuses addresses, so a departed pod is torn down before a new one is set up.

It also keeps one hosts file current with the cluster names the components look up
(``<svc>.<ns>.svc.cluster.local`` and shorter forms → the addresses of the service's pods): the pods see it
as their ``/etc/hosts``, and host processes (KubeRay, the operator) get it bind-mounted over
``/etc/hosts`` in a mount namespace of their own (:func:`with_cluster_hosts`).

Containers do not get images: they run from the serving environment (:mod:`tests.k8s.serving_env`),
installed the way the serving image installs it, with the working tree's code on ``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s import network

log = logging.getLogger("podrunner")

REPO_ROOT = Path(__file__).resolve().parents[2]
LIST_INTERVAL_S = 0.5
# After a container exits: 1 s, 2 s, 4 s ... capped (a kubelet starts at 10 s and caps at 5 min; a test
# would wait too long for that).
BACKOFF_START_S = 1.0
BACKOFF_CAP_S = 10.0
STOP_GRACE_S = 3.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------------------------------
# Host processes that should see cluster names


def with_cluster_hosts(argv: list[str], hosts_file: Path) -> list[str]:
    """``argv`` run in a private mount namespace where ``hosts_file`` is ``/etc/hosts``.

    The network stays the host's (the apiserver on 127.0.0.1 is reachable); only name lookups change.
    Go programs built with CGO_ENABLED=0 (KubeRay) and Python both read /etc/hosts.
    """
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts_file), *argv]


# --------------------------------------------------------------------------------------------------
# Cluster names


class ClusterHosts:
    """One hosts file: the machine's own entries plus the cluster names of the served namespaces.

    Rewritten in place (same inode), never replaced: bind mounts of it (``/etc/netns/*/hosts`` are hard
    links to it; host processes bind-mount it) keep seeing the current content.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base = Path("/etc/hosts").read_text() if Path("/etc/hosts").exists() else ""
        if "localhost" not in self.base:
            self.base += "127.0.0.1 localhost\n::1 localhost\n"
        self.entries: dict[str, str] = {}
        self.path.write_text(self.base)

    def update(self, entries: dict[str, str]) -> bool:
        if entries == self.entries:
            return False
        self.entries = dict(entries)
        lines = [self.base.rstrip("\n"), "# cluster names (test plane)"]
        by_ip: dict[str, list[str]] = {}
        for name, address in sorted(entries.items()):
            by_ip.setdefault(address, []).append(name)
        lines += [f"{address} {' '.join(names)}" for address, names in sorted(by_ip.items())]
        text = ("\n".join(lines) + "\n").encode()
        with self.path.open("r+b") as f:
            old = f.seek(0, os.SEEK_END)
            # Pad instead of truncating first: a reader never sees an empty file.
            f.seek(0)
            f.write(text + b"\n" * max(0, old - len(text)))
        return True


def service_names(service: str, namespace: str) -> list[str]:
    return [
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}",
        service,
    ]


def cluster_entries(core: client.CoreV1Api, namespaces: Iterable[str], pods: list[Any]) -> dict[str, str]:
    """Name → address for every Service with a selector: a ready pod it selects (any pod for headless
    services publishing not-ready addresses, as KubeRay's head service does)."""
    entries: dict[str, str] = {}
    for namespace in namespaces:
        for svc in core.list_namespaced_service(namespace).items:
            selector = svc.spec.selector or {}
            if not selector:
                continue
            chosen = _pick_endpoint(svc, [p for p in pods if p.metadata.namespace == namespace], selector)
            if chosen:
                for name in service_names(svc.metadata.name, namespace):
                    entries[name] = chosen
    return entries


def _pick_endpoint(svc: Any, pods: list[Any], selector: dict[str, str]) -> str | None:
    matching = [
        p
        for p in pods
        if p.status.pod_ip
        and p.metadata.deletion_timestamp is None
        and all((p.metadata.labels or {}).get(k) == v for k, v in selector.items())
    ]
    ready = [p for p in matching if pod_ready(p)]
    candidates = ready or (matching if svc.spec.publish_not_ready_addresses else [])
    return sorted(p.status.pod_ip for p in candidates)[0] if candidates else None


def pod_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


# --------------------------------------------------------------------------------------------------
# Environment


class EnvError(RuntimeError):
    """A referenced Secret/ConfigMap/key is missing (a kubelet reports CreateContainerConfigError)."""


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, unknown ones left as written."""
    return _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), text)


def resolve_env(core: client.CoreV1Api, pod: Any, container: Any) -> dict[str, str]:
    namespace = pod.metadata.namespace
    env: dict[str, str] = {}
    for source in container.env_from or []:
        prefix = source.prefix or ""
        if source.secret_ref is not None:
            data = _secret_data(core, namespace, source.secret_ref.name, source.secret_ref.optional)
        elif source.config_map_ref is not None:
            data = _config_map_data(
                core, namespace, source.config_map_ref.name, source.config_map_ref.optional
            )
        else:
            data = {}
        env.update({f"{prefix}{k}": v for k, v in data.items()})
    for var in container.env or []:
        if var.value_from is None:
            env[var.name] = expand(var.value or "", env)
            continue
        value = _value_from(core, pod, container, var.value_from)
        if value is not None:
            env[var.name] = value
    return env


def _value_from(core: client.CoreV1Api, pod: Any, container: Any, source: Any) -> str | None:
    namespace = pod.metadata.namespace
    if source.secret_key_ref is not None:
        ref = source.secret_key_ref
        data = _secret_data(core, namespace, ref.name, ref.optional)
        return _key(data, ref.key, f"secret {ref.name}", ref.optional)
    if source.config_map_key_ref is not None:
        ref = source.config_map_key_ref
        data = _config_map_data(core, namespace, ref.name, ref.optional)
        return _key(data, ref.key, f"configmap {ref.name}", ref.optional)
    if source.field_ref is not None:
        return field_value(pod, source.field_ref.field_path)
    if source.resource_field_ref is not None:
        ref = source.resource_field_ref
        return resource_value(container, ref.resource, ref.divisor)
    return None


def _key(data: dict[str, str], key: str, where: str, optional: bool | None) -> str | None:
    if key in data:
        return data[key]
    if optional:
        return None
    raise EnvError(f"couldn't find key {key} in {where}")


def _secret_data(core: client.CoreV1Api, namespace: str, name: str, optional: bool | None) -> dict[str, str]:
    import base64

    try:
        secret = core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404 and optional:
            return {}
        raise EnvError(f'secret "{name}" not found') from exc
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}


def _config_map_data(
    core: client.CoreV1Api, namespace: str, name: str, optional: bool | None
) -> dict[str, str]:
    try:
        config_map = core.read_namespaced_config_map(name, namespace)
    except ApiException as exc:
        if exc.status == 404 and optional:
            return {}
        raise EnvError(f'configmap "{name}" not found') from exc
    return dict(config_map.data or {})


_FIELD_INDEX = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: Any, path: str) -> str:
    simple = {
        "metadata.name": pod.metadata.name,
        "metadata.namespace": pod.metadata.namespace,
        "metadata.uid": pod.metadata.uid,
        "spec.nodeName": pod.spec.node_name,
        "spec.serviceAccountName": pod.spec.service_account_name,
        "status.podIP": pod.status.pod_ip,
        "status.hostIP": pod.status.host_ip,
    }
    if path in simple:
        return str(simple[path] or "")
    indexed = _FIELD_INDEX.match(path)
    if indexed:
        mapping = getattr(pod.metadata, indexed.group(1)) or {}
        return str(mapping.get(indexed.group(2), ""))
    raise EnvError(f"unsupported fieldRef {path}")


GPU_RESOURCE = "nvidia.com/gpu"


def device_env(container: Any, node: str) -> dict[str, str]:
    """What NVIDIA's device plugin adds to a container granted ``nvidia.com/gpu`` (its Allocate answer):
    the devices it may use, by id. Ray itself learns the count from KubeRay's ``ray start --num-gpus``
    (taken from the same limit); CUDA_VISIBLE_DEVICES is Ray's to set per worker, not the device plugin's.
    The machine has no GPU: the ids name the fake node's devices."""
    from kubernetes.utils import parse_quantity

    limits = (container.resources.limits if container.resources else None) or {}
    count = int(parse_quantity(limits.get(GPU_RESOURCE, "0")))
    if count <= 0:
        return {}
    return {"NVIDIA_VISIBLE_DEVICES": ",".join(f"GPU-{node}-{index}" for index in range(count))}


def resource_value(container: Any, resource: str, divisor: Any) -> str:
    from kubernetes.utils import parse_quantity

    kind, _, name = resource.partition(".")
    values = getattr(container.resources, kind, None) or {} if container.resources else {}
    raw = values.get(name)
    if raw is None:
        return "0"
    amount = parse_quantity(raw) / parse_quantity(divisor or "1")
    return str(int(-(-amount // 1)))  # a kubelet rounds up


# --------------------------------------------------------------------------------------------------
# A pod's sandbox: network namespace, hosts, private /tmp


@dataclass
class Sandbox:
    uid: str
    address: str
    prefix: str  # the plane's netns prefix
    hosts: ClusterHosts
    root: Path  # where private /tmp directories live

    @property
    def netns(self) -> str:
        return f"{self.prefix}{self.uid[:8]}"

    @property
    def tmp(self) -> Path:
        return self.root / self.uid / "tmp"

    def _veth(self) -> tuple[str, str]:
        digest = hashlib.sha256(self.uid.encode()).hexdigest()[:8]
        return f"rsh{digest}", f"rsc{digest}"

    def create(self) -> None:
        host_end, pod_end = self._veth()
        self.destroy()  # a leftover of the same pod (a crashed runner): start clean
        etc = network.NETNS_ETC / self.netns
        etc.mkdir(parents=True, exist_ok=True)
        os.link(self.hosts.path, etc / "hosts")
        (etc / "resolv.conf").write_text(
            # Nothing answers DNS in a pod namespace: names come from the hosts file, lookups of others
            # fail at once on loopback instead of waiting for a resolver that cannot be reached.
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
        )
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.tmp.chmod(0o1777)
        prefix_len = network.POD_CIDR.split("/")[1]
        steps = [
            ["netns", "add", self.netns],
            ["link", "add", host_end, "type", "veth", "peer", "name", pod_end],
            ["link", "set", pod_end, "netns", self.netns],
            ["link", "set", host_end, "master", network.BRIDGE, "up"],
            ["-n", self.netns, "link", "set", "lo", "up"],
            ["-n", self.netns, "addr", "add", f"{self.address}/{prefix_len}", "dev", pod_end],
            ["-n", self.netns, "link", "set", pod_end, "name", "eth0", "up"],
            ["-n", self.netns, "route", "add", "default", "via", network.BRIDGE_IP],
        ]
        for step in steps:
            network.ip(*step)

    def destroy(self) -> None:
        host_end, _ = self._veth()
        if self.netns in network.list_namespaces(self.netns):
            network.delete_namespace(self.netns)
        network.ip("link", "delete", host_end, check=False)
        shutil.rmtree(network.NETNS_ETC / self.netns, ignore_errors=True)
        shutil.rmtree(self.root / self.uid, ignore_errors=True)

    def reset_tmp(self) -> None:
        """A restarted container gets a fresh filesystem: clear what the previous one left in /tmp."""
        network.kill_namespace_processes(self.netns)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.tmp.chmod(0o1777)

    @property
    def service_account(self) -> Path:
        """The pod's projected service-account files (token, ca.crt, namespace), when it has an account."""
        return self.root / self.uid / "serviceaccount"

    def volume(self, name: str) -> Path:
        """The files of the pod's projected volume ``name``."""
        return self.root / self.uid / "volumes" / name

    def argv(self, command: list[str], mounts: Iterable[tuple[Path, str]] = ()) -> list[str]:
        """``command`` inside the pod: its network namespace, hosts, resolv.conf, private /tmp, when it
        has a service account the account's files where in-cluster clients look for them, and the
        container's own ``mounts`` (source, mount path), read-only."""
        # Before /tmp is replaced: the plane's own files may live under the host's /tmp.
        steps = []
        if self.service_account.is_dir():
            mount_point = shlex.quote(str(network.SERVICE_ACCOUNT_MOUNT))
            steps.append(f"mount --bind {shlex.quote(str(self.service_account))} {mount_point}")
        for source, path in mounts:
            target = shlex.quote(path)
            steps += [
                f"mount --bind {shlex.quote(str(source))} {target}",
                f"mount -o remount,bind,ro {target}",
            ]
        tree = tree_under_tmp(REPO_ROOT)
        if tree is not None:
            # A working tree under /tmp (a clone made there) would be hidden by the private /tmp, and the
            # pods import the project from it: it is bind-mounted at the same path inside the private one.
            inside = shlex.quote(str(self.tmp / tree))
            steps += [f"mkdir -p {inside}", f"mount --bind {shlex.quote(str(REPO_ROOT))} {inside}"]
        steps.append(f"mount --rbind {shlex.quote(str(self.tmp))} /tmp")
        script = " && ".join([*steps, 'exec "$@"'])
        return ["ip", "netns", "exec", self.netns, "sh", "-c", script, "pod", *command]

    def project_service_account(self, token: str, namespace: str, ca_cert: Path) -> None:
        self.service_account.mkdir(parents=True, exist_ok=True)
        (self.service_account / "token").write_text(token)
        (self.service_account / "namespace").write_text(namespace)
        shutil.copyfile(ca_cert, self.service_account / "ca.crt")

    def project_volume(self, name: str, files: dict[str, str]) -> None:
        directory = self.volume(name)
        directory.mkdir(parents=True, exist_ok=True)
        for path, text in files.items():
            (directory / path).write_text(text)


def tree_under_tmp(path: Path) -> Path | None:
    """`path` relative to /tmp when it lies there, else None."""
    try:
        return path.resolve().relative_to("/tmp")
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Probes


@dataclass
class Readiness:
    """A container's readiness probe state, as a kubelet keeps it."""

    probe: Any
    started: float
    ready: bool = False
    successes: int = 0
    failures: int = 0
    next_at: float = 0.0

    def due(self, at: float) -> bool:
        if self.probe is None:
            return False
        first = self.started + (self.probe.initial_delay_seconds or 0)
        return at >= max(first, self.next_at)

    def record(self, ok: bool, at: float) -> None:
        self.next_at = at + (self.probe.period_seconds or 10)
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= (self.probe.success_threshold or 1):
                self.ready = True
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= (self.probe.failure_threshold or 3):
                self.ready = False


def run_probe(
    probe: Any, sandbox: Sandbox, env: dict[str, str], container: Any, mounts: list[tuple[Path, str]]
) -> bool:
    timeout = float(probe.timeout_seconds or 1)
    if probe.http_get is not None:
        port = _port(probe.http_get.port, container)
        path = probe.http_get.path or "/"
        url = f"http://{sandbox.address}:{port}{path if path.startswith('/') else '/' + path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return 200 <= int(response.status) < 400
        except (urllib.error.URLError, OSError):
            return False
    # The generated client names the `exec` field `var_exec` (older versions: `_exec`).
    exec_action = getattr(probe, "var_exec", None) or getattr(probe, "_exec", None)
    if exec_action is not None:
        try:
            done = subprocess.run(
                sandbox.argv(list(exec_action.command), mounts),
                env=env,
                capture_output=True,
                timeout=timeout + 1,
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0
    if probe.tcp_socket is not None:
        import socket

        try:
            with socket.create_connection(
                (sandbox.address, _port(probe.tcp_socket.port, container)), timeout
            ):
                return True
        except OSError:
            return False
    return True


def _port(port: Any, container: Any) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.ports or []:
        if p.name == port:
            return int(p.container_port)
    raise ValueError(f"no container port named {port}")


# --------------------------------------------------------------------------------------------------
# Containers


@dataclass
class ContainerRun:
    """One container of a pod: its process, restarts and status."""

    spec: Any
    env: dict[str, str]
    log: Path
    mounts: list[tuple[Path, str]] = field(default_factory=list)  # its own: (source, mount path)
    proc: subprocess.Popen[bytes] | None = None
    started_at: str = ""
    started_mono: float = 0.0
    restarts: int = 0
    last_terminated: dict[str, Any] | None = None
    waiting_reason: str = "ContainerCreating"
    waiting_message: str = ""
    restart_at: float = 0.0
    readiness: Readiness | None = None

    def command(self) -> list[str]:
        words = [expand(w, self.env) for w in [*(self.spec.command or []), *(self.spec.args or [])]]
        if not words:
            raise EnvError(f"container {self.spec.name} has no command (images are not run here)")
        return words

    def start(self, sandbox: Sandbox) -> None:
        argv = ["setpriv", "--pdeathsig", "KILL", "--", *sandbox.argv(self.command(), self.mounts)]
        with self.log.open("ab") as out:
            out.write(f"--- start {now()}: {shlex.join(self.command())}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
                cwd="/",
            )
        self.started_at, self.started_mono = now(), time.monotonic()
        self.waiting_reason = ""
        self.readiness = Readiness(self.spec.readiness_probe, self.started_mono)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready(self) -> bool:
        if not self.running():
            return False
        return self.readiness is None or self.readiness.probe is None or self.readiness.ready

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "name": self.spec.name,
            "image": self.spec.image or "",
            "imageID": "",
            "ready": self.ready(),
            "restartCount": self.restarts,
            "started": self.running(),
        }
        if self.running():
            status["state"] = {"running": {"startedAt": self.started_at}}
        else:
            waiting = {"reason": self.waiting_reason or "ContainerCreating"}
            if self.waiting_message:
                waiting["message"] = self.waiting_message
            status["state"] = {"waiting": waiting}
        if self.last_terminated:
            status["lastState"] = {"terminated": self.last_terminated}
        return status


# --------------------------------------------------------------------------------------------------
# One pod


class PodWorker(threading.Thread):
    """Runs one pod until told to stop; the thread that starts the processes lives as long as they do
    (a parent-death signal fires when the thread that forked a process exits)."""

    def __init__(self, runner: PodRunner, pod: Any) -> None:
        super().__init__(name=f"pod-{pod.metadata.namespace}/{pod.metadata.name}", daemon=True)
        self.runner = runner
        self.pod = pod
        self.uid: str = pod.metadata.uid
        self.stop_event = threading.Event()
        self.sandbox = Sandbox(
            uid=self.uid,
            address=pod.status.pod_ip,
            prefix=runner.netns_prefix,
            hosts=runner.hosts,
            root=runner.workdir / "pods",
        )
        self.log_dir = (
            runner.workdir / "logs" / f"{pod.metadata.namespace}_{pod.metadata.name}_{self.uid[:8]}"
        )
        self.containers: list[ContainerRun] = []
        self.last_status: Any = None
        self.error: BaseException | None = None

    # ---- lifecycle

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported, never raised into the runner
            self.error = exc
            log.exception("pod %s failed", self.name)
        finally:
            for container in self.containers:
                container.stop()
            self.sandbox.destroy()

    def stop(self) -> None:
        self.stop_event.set()

    def _run(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.runner.ensure_environment()
        except Exception as exc:
            # What a kubelet reports for an image it cannot pull: the pod stays, not ready, with the reason.
            self.containers = [
                ContainerRun(c, {}, self.log_dir / f"{c.name}.log") for c in self.pod.spec.containers
            ]
            for container in self.containers:
                container.waiting_reason, container.waiting_message = "ErrImagePull", str(exc)[-500:]
            self._report()
            raise
        if self.stop_event.is_set():
            return
        self.sandbox.create()
        log.info("pod %s: sandbox %s at %s", self.name, self.sandbox.netns, self.sandbox.address)
        core = self.runner.core
        base_env = self.runner.base_env()
        if not self._project_service_account(core):
            return
        for init in self.pod.spec.init_containers or []:
            if not self._run_init(core, init, base_env):
                return
        runs = []
        for spec in self.pod.spec.containers:
            env = self._container_env(core, spec, base_env)
            if env is None:
                return
            runs.append(ContainerRun(spec, env, self.log_dir / f"{spec.name}.log", self._mounts(spec)))
        self.containers = runs
        for container in self.containers:
            container.start(self.sandbox)
        self._report()
        while not self.stop_event.wait(0.5):
            self._tend()
            self._report()

    def _container_env(
        self, core: client.CoreV1Api, spec: Any, base: dict[str, str]
    ) -> dict[str, str] | None:
        """The container's environment; while a referenced Secret/ConfigMap/key is missing, the pod shows
        CreateContainerConfigError and the lookup is retried, as a kubelet does (KubeRay creates the
        auth-token Secret alongside the pods). None once the pod is going."""
        while not self.stop_event.is_set():
            try:
                return {
                    **base,
                    **device_env(spec, self.pod.spec.node_name),
                    **resolve_env(core, self.pod, spec),
                }
            except EnvError as exc:
                log.warning("pod %s container %s: %s", self.name, spec.name, exc)
                waiting = ContainerRun(spec, {}, self.log_dir / f"{spec.name}.log")
                waiting.waiting_reason, waiting.waiting_message = "CreateContainerConfigError", str(exc)
                if spec.name in {c.name for c in self.pod.spec.containers}:
                    self.containers = [waiting]
                    self._report()
                self.stop_event.wait(1.0)
        return None

    def _project_service_account(self, core: client.CoreV1Api) -> bool:
        """Writes a token of the pod's service account, bound to the pod, with the cluster CA, where a
        kubelet projects them (unless the pod turns that off), and the files of its projected volumes
        that hold such a token. While the account (or a ConfigMap a volume names) does not exist the pod
        waits, reported as a container config error (here the ServiceAccount admission plugin is off, so
        nothing refused the pod; KubeRay creates the autoscaler's account alongside the head pod). False
        once the pod is going.

        Tokens are not renewed: no plane runs as long as they live.
        """
        spec = self.pod.spec
        account = spec.service_account_name
        if not account or self.runner.ca_cert is None:
            return True
        namespace = self.pod.metadata.namespace
        while not self.stop_event.is_set():
            try:
                token = None
                if spec.automount_service_account_token is not False:
                    token = issue_token(core, namespace, account, pod=self.pod)
                volumes = {
                    v.name: projected_files(core, self.pod, account, v.projected) for v in token_volumes(spec)
                }
            except ApiException as exc:
                if exc.status != 404:
                    raise
                message = f"serviceaccount {namespace}/{account} not found"
            except EnvError as exc:  # a ConfigMap a volume names (kube-root-ca.crt comes a moment later)
                message = str(exc)
            else:
                if token is not None:
                    self.sandbox.project_service_account(token, namespace, self.runner.ca_cert)
                for name, files in volumes.items():
                    self.sandbox.project_volume(name, files)
                return True
            log.warning("pod %s: %s", self.name, message)
            self.containers = [ContainerRun(c, {}, self.log_dir / f"{c.name}.log") for c in spec.containers]
            for waiting in self.containers:
                waiting.waiting_reason, waiting.waiting_message = "CreateContainerConfigError", message
            self._report()
            self.stop_event.wait(1.0)
        return False

    def _mounts(self, container: Any) -> list[tuple[Path, str]]:
        """The projected token volumes this container mounts: no other container of the pod sees them."""
        names = {v.name for v in token_volumes(self.pod.spec)}
        return [
            (self.sandbox.volume(m.name), str(m.mount_path))
            for m in container.volume_mounts or []
            if m.name in names and self.sandbox.volume(m.name).is_dir()
        ]

    def _run_init(self, core: client.CoreV1Api, spec: Any, base: dict[str, str]) -> bool:
        env = self._container_env(core, spec, base)
        if env is None:
            return False
        init = ContainerRun(spec, env, self.log_dir / f"init-{spec.name}.log", self._mounts(spec))
        while not self.stop_event.is_set():
            init.start(self.sandbox)
            while init.exited() is None and not self.stop_event.wait(0.25):
                pass
            if init.exited() == 0:
                return True
            init.stop()
            if self.stop_event.wait(BACKOFF_START_S):
                break
        init.stop()
        return False

    def _tend(self) -> None:
        at = time.monotonic()
        for container in self.containers:
            code = container.exited()
            if container.proc is not None and code is not None and container.waiting_reason == "":
                self._record_exit(container, code)
            if container.waiting_reason == "CrashLoopBackOff" and at >= container.restart_at:
                self.sandbox.reset_tmp()
                container.restarts += 1
                container.start(self.sandbox)
            readiness = container.readiness
            if container.running() and readiness is not None and readiness.due(at):
                ok = run_probe(readiness.probe, self.sandbox, container.env, container.spec, container.mounts)
                readiness.record(ok, time.monotonic())

    def _record_exit(self, container: ContainerRun, code: int) -> None:
        log.info("pod %s: container %s exited with %s", self.name, container.spec.name, code)
        container.last_terminated = {
            "exitCode": code if code >= 0 else 128 - code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": container.started_at,
            "finishedAt": now(),
        }
        policy = self._restart_policy()
        if policy == "Never" or (policy == "OnFailure" and code == 0):
            container.waiting_reason = "Terminated"
            return
        delay = min(BACKOFF_CAP_S, BACKOFF_START_S * 2**container.restarts)
        container.waiting_reason = "CrashLoopBackOff"
        container.waiting_message = f"back-off {delay:.0f}s restarting failed container={container.spec.name}"
        container.restart_at = time.monotonic() + delay

    def _api_agrees(self, ready: bool) -> bool:
        conditions = {c.type: c.status for c in (self.pod.status.conditions or [])}
        want = "True" if ready else "False"
        return conditions.get("Ready") == want and conditions.get("ContainersReady") == want

    def _restart_policy(self) -> str:
        return str(self.pod.spec.restart_policy or "Always")

    # ---- status

    def _report(self) -> None:
        statuses = [c.status() for c in self.containers]
        ready = bool(self.containers) and all(c.ready() for c in self.containers)
        terminated = [c for c in self.containers if c.waiting_reason == "Terminated"]
        phase = "Running"
        if terminated and len(terminated) == len(self.containers):
            codes = [c.last_terminated["exitCode"] for c in terminated if c.last_terminated]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        # A terminated container reports its final state, not "waiting".
        for status, container in zip(statuses, self.containers, strict=True):
            if container.waiting_reason == "Terminated" and container.last_terminated:
                status["state"] = {"terminated": container.last_terminated}
                status.pop("lastState", None)
        key = (ready, phase, repr(statuses))
        # Also when the API shows something else: the node lifecycle controller marks pods NotReady when a
        # (KWOK) node's heartbeat is late, and a kubelet's status manager writes its view back.
        if key == self.last_status and self._api_agrees(ready):
            return
        flag = "True" if ready else "False"
        stamp = now()
        body = {
            "status": {
                "phase": phase,
                "conditions": [
                    {"type": "Ready", "status": flag, "lastTransitionTime": stamp},
                    {"type": "ContainersReady", "status": flag, "lastTransitionTime": stamp},
                ],
                "containerStatuses": statuses,
            }
        }
        try:
            self.runner.core.patch_namespaced_pod_status(
                self.pod.metadata.name,
                self.pod.metadata.namespace,
                body,
                _content_type="application/strategic-merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                self.stop()
                return
            raise
        self.last_status = key


TOKEN_SECONDS = 3600


def token_volumes(pod_spec: Any) -> list[Any]:
    """The pod's projected volumes that hold a service-account token."""
    return [
        v
        for v in pod_spec.volumes or []
        if v.projected is not None
        and any(s.service_account_token is not None for s in v.projected.sources or [])
    ]


def projected_files(core: client.CoreV1Api, pod: Any, account: str, projected: Any) -> dict[str, str]:
    """The files (path → text) of a projected volume, from the sources a kube-api-access volume uses."""
    namespace = pod.metadata.namespace
    files: dict[str, str] = {}
    for source in projected.sources or []:
        if source.service_account_token is not None:
            wanted = source.service_account_token
            audience = [wanted.audience] if wanted.audience else []
            seconds = wanted.expiration_seconds or TOKEN_SECONDS
            files[wanted.path] = issue_token(core, namespace, account, seconds, pod=pod, audiences=audience)
        elif source.config_map is not None:
            ref = source.config_map
            data = _config_map_data(core, namespace, ref.name, ref.optional)
            items = ref.items or [client.V1KeyToPath(key=k, path=k) for k in data]
            for item in items:
                value = _key(data, item.key, f'configmap "{ref.name}"', ref.optional)
                if value is not None:
                    files[item.path] = value
        elif source.downward_api is not None:
            for item in source.downward_api.items or []:
                if item.field_ref is None:
                    raise EnvError(f"downwardAPI item {item.path}: only fieldRef is supported here")
                files[item.path] = field_value(pod, item.field_ref.field_path)
        else:
            raise EnvError("projected volume: only serviceAccountToken, configMap and downwardAPI here")
    return files


def issue_token(
    core: client.CoreV1Api,
    namespace: str,
    account: str,
    seconds: int = TOKEN_SECONDS,
    pod: Any = None,
    audiences: list[str] | None = None,
) -> str:
    """A token of ``account`` from the TokenRequest API; bound to ``pod`` when given (the apiserver
    stops honouring it when the pod goes)."""
    bound = None
    if pod is not None:
        bound = client.V1BoundObjectReference(
            api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
        )
    # Empty audiences: the apiserver's own, so the token authenticates against it.
    spec = client.V1TokenRequestSpec(
        audiences=audiences or [], expiration_seconds=seconds, bound_object_ref=bound
    )
    issued = core.create_namespaced_service_account_token(
        account, namespace, client.AuthenticationV1TokenRequest(spec=spec)
    )
    if issued.status is None or not issued.status.token:
        raise EnvError(f"TokenRequest for {namespace}/{account} returned no token")
    return str(issued.status.token)


# --------------------------------------------------------------------------------------------------
# The runner


@dataclass
class PodRunner:
    """Watches pods (by polling: simple, and the apiserver is local) and runs those it serves."""

    api_factory: Callable[[], client.ApiClient]
    namespaces: tuple[str, ...]
    nodes: tuple[str, ...]
    workdir: Path
    environment: Callable[[], Path]  # installs (or finds) the serving environment, returns its directory
    hosts: ClusterHosts
    extra_env: dict[str, str] = field(default_factory=dict)
    # The apiserver as pods reach it (``https://host:port``) and its CA: pods get the address in the
    # environment a kubelet gives every pod, and pods with a service account its token and the CA.
    api_server: str | None = None
    ca_cert: Path | None = None
    netns_prefix: str = field(default_factory=lambda: network.netns_prefix(os.getpid()))
    workers: dict[str, PodWorker] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._api = self.api_factory()
        self.core = client.CoreV1Api(self._api)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._env_lock = threading.Lock()
        self._env_dir: Path | None = None

    def start(self) -> PodRunner:
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for worker in list(self.workers.values()):
            worker.stop()
        for worker in list(self.workers.values()):
            worker.join(timeout=30)
        self.workers.clear()
        for name in network.list_namespaces(self.netns_prefix):
            network.delete_namespace(name)
        self._api.close()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_environment(self) -> Path:
        with self._env_lock:
            if self._env_dir is None:
                self._env_dir = self.environment()
            return self._env_dir

    def base_env(self) -> dict[str, str]:
        """What the image would provide: the environment's executables first, the code, a HOME."""
        env_dir = self.ensure_environment()
        return {
            "PATH": f"{env_dir / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": f"{REPO_ROOT / 'operator'}:{REPO_ROOT}",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            **self.api_server_env(),
            **self.extra_env,
        }

    def api_server_env(self) -> dict[str, str]:
        """What a kubelet tells every pod about the apiserver (there, the `kubernetes` Service)."""
        if self.api_server is None:
            return {}
        address = urllib.parse.urlsplit(self.api_server)
        host, port = str(address.hostname), str(address.port or 443)
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
        }

    def pod_logs(self, namespace: str, name: str) -> str:
        """The logs of a pod's containers (all runs), for failure reports."""
        matches = sorted((self.workdir / "logs").glob(f"{namespace}_{name}_*/*.log"))
        return "\n".join(f"----- {p}\n{p.read_text(errors='replace')[-4000:]}" for p in matches)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception as exc:  # the apiserver restarting: keep going
                log.warning("pod runner sync failed: %s", exc)
            self._stop.wait(LIST_INTERVAL_S)

    def _sync(self) -> None:
        pods = [p for ns in self.namespaces for p in self.core.list_namespaced_pod(ns).items]
        served = {
            p.metadata.uid: p
            for p in pods
            if p.spec.node_name in self.nodes and p.status.pod_ip and p.metadata.deletion_timestamp is None
        }
        # Departed pods first: their addresses may already belong to new pods.
        for uid in [u for u in self.workers if u not in served]:
            worker = self.workers.pop(uid)
            worker.stop()
            worker.join(timeout=60)
        for uid, pod in served.items():
            worker = self.workers.get(uid)
            if worker is None:
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
            else:
                worker.pod = pod
        self.hosts.update(cluster_entries(self.core, self.namespaces, pods))
