"""A real Kubernetes control plane for tests, run from locally built binaries (see ``tools/README.md``).

etcd, kube-apiserver (RBAC on, static admin token, service-account tokens), kube-controller-manager
(garbage collection, namespaces, service accounts), kube-scheduler, KWOK (a fake CPU node and a fake
GPU node whose pods turn Running) and the real KubeRay operator, which only watches two namespaces so
that every other namespace stays free for tests that write RayService status themselves. In one of them
(:data:`RAY_NAMESPACE`) the pod runner (``tests/k8s/podrunner.py``) runs the pods' containers for real,
so KubeRay drives real Ray; in the other (:data:`KUBERAY_NAMESPACE`) pods only look Running and never
turn Ready, like pods whose Ray never starts (KubeRay then keeps reconciling cluster shape, where a Ready
head with no dashboard behind it would stall it at the Serve status query).

The plane owns its pod, service and node address ranges on this machine while it runs
(``tests/k8s/network.py``), so nothing sent to a cluster address leaves the machine; that needs root.

Everything binds to loopback on free ports, logs into a temporary directory and runs in its own
process group, so :meth:`ControlPlane.stop` (or the death of the Python process that started it)
leaves nothing behind. ``python -m tests.k8s.plane`` starts one for manual use.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.k8s import network, serving_env
from tests.k8s.podrunner import ClusterHosts, PodRunner, issue_token, with_cluster_hosts

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "tools" / "versions.env"

# The fake nodes. Tests import these names instead of repeating literals.
CPU_NODE = "kwok-cpu"
GPU_NODE = "kwok-gpu"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GPU_PRODUCT = "NVIDIA-A10G"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
KUBERAY_NAMESPACE = "kuberay-watched"
# Watched by KubeRay too; the pod runner runs the containers of pods here (real Ray).
RAY_NAMESPACE = "kuberay-ray"
APISERVER = "kube-apiserver"
# The kinds the KubeRay operator watches (it exits if one is unknown). RayCronJob's controller is
# behind a feature gate that is off, and each CRD costs the apiserver seconds of CPU to establish.
KUBERAY_CRDS = ("rayclusters", "rayjobs", "rayservices")

CRD_GROUP = "apiextensions.k8s.io"
SERVICE_CIDR = network.SERVICE_CIDR
POD_CIDR = network.POD_CIDR
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# KWOK's own "fast" stages: nodes turn Ready and keep a lease; pods turn Running at once and
# disappear when deleted (so namespace deletion and garbage collection complete). The pod-ready stage is
# split (:func:`kwok_pod_stages`): in RAY_NAMESPACE Ready comes from the pod runner's probes.
KWOK_STAGES = (
    "kustomize/stage/node/fast/node-initialize.yaml",
    "kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "kustomize/stage/pod/fast/pod-complete.yaml",
    "kustomize/stage/pod/fast/pod-delete.yaml",
)
KWOK_POD_READY_STAGE = "kustomize/stage/pod/fast/pod-ready.yaml"


# mint_kubeconfig(namespace, service_account, *, expiration_seconds=3600) -> kubeconfig path
MintKubeconfig = Callable[..., Path]


class PlaneError(RuntimeError):
    """The control plane failed to start or a component died; the message carries log tails."""


class ToolsMissing(PlaneError):
    """A binary or module directory that ``make tools`` produces is absent."""


class NetworkUnavailable(PlaneError):
    """The machine does not let the plane own its address ranges (root and network namespaces needed)."""


# What every pod's "node" provides besides the container's env: Ray's object store is capped (by
# default it takes 30 % of the machine's memory per node, and several Ray nodes share this machine).
POD_NODE_ENV = {"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(100 * 1024 * 1024)}


def write_pod_stages(tools: Tools, directory: Path, not_ready_namespaces: Sequence[str]) -> list[Path]:
    """KWOK's pod-ready stage, split by namespace.

    Outside ``not_ready_namespaces`` it is KWOK's own (pods turn Ready at once). Inside, pods get their
    address and turn Running with Ready=False and containers waiting; in the pod runner's namespace the
    runner then starts the containers, runs the readiness probes and writes Ready itself.
    """
    original = yaml.safe_load((tools.kwok_module / KWOK_POD_READY_STAGE).read_text())
    elsewhere = json.loads(json.dumps(original))
    elsewhere["spec"]["selector"]["matchExpressions"].append(
        {"key": ".metadata.namespace", "operator": "NotIn", "values": list(not_ready_namespaces)}
    )
    here = json.loads(json.dumps(original))
    here["metadata"]["name"] = "pod-start-for-runner"
    here["spec"]["selector"]["matchExpressions"].append(
        {"key": ".metadata.namespace", "operator": "In", "values": list(not_ready_namespaces)}
    )
    template = here["spec"]["next"]["statusTemplate"]
    replacements = {
        '  status: "True"\n  type: Ready\n': '  status: "False"\n  type: Ready\n',
        '  status: "True"\n  type: ContainersReady\n': '  status: "False"\n  type: ContainersReady\n',
        "  ready: true\n  restartCount: 0\n  state:\n    running:\n      startedAt: {{ $now | Quote }}\n": (
            "  ready: false\n  restartCount: 0\n  state:\n    waiting:\n      reason: ContainerCreating\n"
        ),
    }
    for old, new in replacements.items():
        if template.count(old) < 1:
            raise PlaneError(f"KWOK's pod-ready stage changed; cannot derive the runner's stage ({old!r})")
        template = template.replace(old, new, 1)
    here["spec"]["next"]["statusTemplate"] = template
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, stage in (("pod-ready.yaml", elsewhere), ("pod-start-for-runner.yaml", here)):
        path = directory / name
        path.write_text(yaml.safe_dump(stage, sort_keys=False))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Tools


@dataclass(frozen=True)
class Tools:
    """Paths of the pinned binaries and module sources built by ``tools/build.sh``."""

    etcd: Path
    kube: Path  # multi-call: kube-apiserver | kube-controller-manager | kube-scheduler
    kwok: Path
    kuberay: Path
    helm: Path
    kuberay_module: Path
    kwok_module: Path

    @property
    def kuberay_crd_dir(self) -> Path:
        return self.kuberay_module / "config" / "crd" / "bases"


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parses ``tools/versions.env`` (``KEY=value`` lines), the single source of the pinned versions."""
    versions: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip().strip("\"'")
    return versions


def tools_dir() -> Path:
    return Path(os.environ.get("REGSERVE_TOOLS_DIR", Path.home() / ".cache" / "regserve-tools"))


def find_tools() -> Tools:
    """Locates every tool at its pinned version; raises :class:`ToolsMissing` naming what is absent."""
    v = read_versions()
    root = tools_dir()
    tools = Tools(
        etcd=root / "bin" / f"etcd-{v['ETCD_VERSION']}",
        kube=root / "bin" / f"kube-multi-{v['KUBERNETES_VERSION']}",
        kwok=root / "bin" / f"kwok-{v['KWOK_VERSION']}",
        kuberay=root / "bin" / f"kuberay-operator-{v['KUBERAY_VERSION']}",
        helm=root / "bin" / f"helm-{v['HELM_VERSION']}",
        kuberay_module=root / f"ray-operator-{v['KUBERAY_VERSION']}",
        kwok_module=root / f"kwok-{v['KWOK_VERSION']}",
    )
    missing = [
        str(p) for p in (tools.etcd, tools.kube, tools.kwok, tools.kuberay, tools.helm) if not _is_exe(p)
    ]
    missing += [str(p) for p in (tools.kuberay_crd_dir, tools.kwok_module) if not p.is_dir()]
    if missing:
        raise ToolsMissing("control-plane tools missing (run `make tools`): " + ", ".join(missing))
    return tools


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --------------------------------------------------------------------------------------------------
# Certificates, tokens, kubeconfigs


@dataclass(frozen=True)
class Credentials:
    ca_cert: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path  # private: signs service-account tokens
    sa_pub: Path
    token_file: Path
    tokens: dict[str, str]  # user name -> bearer token


# Every component is its own user (readable audit/log attribution) in system:masters: the plane tests
# our RBAC, not theirs.
COMPONENT_USERS = ("admin", "kube-controller-manager", "kube-scheduler", "kwok", "kuberay-operator")


def make_credentials(directory: Path) -> Credentials:
    """Writes a CA, the apiserver's serving cert, the service-account key pair and a static token file.

    EC P-256 keys: generating RSA keys would cost seconds of the session's startup on 2 cores.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def cert(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        issuer_key: ec.EllipticCurvePrivateKey,
        ca: bool,
        sans: list[x509.GeneralName],
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("regserve-test-ca", ca_key, None, ca_key, True, [])
    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
        x509.IPAddress(ipaddress.ip_address(network.BRIDGE_IP)),
    ]
    srv_cert = cert("kube-apiserver", srv_key, ca_cert.subject, ca_key, False, sans)
    sa_key = ec.generate_private_key(ec.SECP256R1())

    creds = Credentials(
        ca_cert=directory / "ca.crt",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
        token_file=directory / "tokens.csv",
        tokens={user: secrets.token_urlsafe(32) for user in COMPONENT_USERS},
    )
    creds.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    creds.serving_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    creds.serving_key.write_bytes(pem_key(srv_key))
    creds.sa_key.write_bytes(pem_key(sa_key))
    creds.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    creds.token_file.write_text(
        "".join(f'{token},{user},{user},"system:masters"\n' for user, token in creds.tokens.items())
    )
    for secret in (creds.serving_key, creds.sa_key, creds.token_file):
        secret.chmod(0o600)
    return creds


def kubeconfig_dict(server: str, ca_pem: bytes, user: str, token: str) -> dict[str, Any]:
    """A self-contained kubeconfig (CA embedded), so it can be handed to any process as one file."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "regserve-test",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "regserve-test", "user": user}}],
        "current-context": user,
    }


def write_kubeconfig(path: Path, server: str, ca_pem: bytes, user: str, token: str) -> Path:
    path.write_text(yaml.safe_dump(kubeconfig_dict(server, ca_pem, user, token)))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    """A currently free loopback port. Racy by nature; the window is short and ports are random."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Component:
    """One child process, logging to its own file, in its own process group."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = self.argv
        # The parent-death signal kills the component if the test process dies without cleanup
        # (CI timeout, SIGKILL): a leaked apiserver would hold ports and CPU for the next run.
        setpriv = shutil.which("setpriv")
        if setpriv:
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


def wait_for(
    what: str,
    check: Callable[[], bool],
    timeout: float,
    interval: float = 0.2,
    watch: Callable[[], None] | None = None,
) -> float:
    """Polls ``check`` until true; ``watch`` raises early (e.g. a process died). Returns seconds waited."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if watch is not None:
            watch()
        if check():
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise PlaneError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_ok(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def insecure_context() -> ssl.SSLContext:
    """For loopback health probes of components that serve self-signed certificates of their own."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------------------------------
# The plane


@dataclass
class ControlPlane:
    """A running (after :meth:`start`) control plane. Use as a context manager or call start/stop."""

    tools: Tools
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="regserve-plane-")))
    kuberay_namespace: str = KUBERAY_NAMESPACE
    ray_namespace: str = RAY_NAMESPACE
    crd_files: list[Path] = field(default_factory=lambda: sorted((REPO_ROOT / "crds").glob("*.yaml")))
    startup_timeout: float = 120.0
    components: dict[str, Component] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    server: str = ""
    creds: Credentials | None = None
    etcd_url: str = ""
    scheduler_port: int = 0
    controller_manager_port: int = 0
    kuberay_probe_port: int = 0
    runner: PodRunner | None = None
    cluster_hosts: ClusterHosts | None = None
    owns_network: bool = False

    # ---- public API

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_pem(self) -> bytes:
        assert self.creds is not None, "plane not started"
        return self.creds.ca_cert.read_bytes()

    def start(self) -> ControlPlane:
        """Starts everything; on failure stops what started and raises :class:`PlaneError` with logs."""
        begin = time.monotonic()
        try:
            self._timed("network", self._own_network)
            self._timed("certs", self._prepare)
            self._timed("etcd", self._start_etcd)
            self._timed("apiserver", self._start_apiserver)
            self._start_scheduler_and_kwok()
            self._timed("crds_nodes_namespace", self._seed_api)
            self._start_controller_manager_and_kuberay()
            self._timed("components_ready", self._wait_components)
            self._start_runner()
        except BaseException as exc:
            logs = self.log_tails()
            self.stop(keep_logs=True)
            if isinstance(exc, PlaneError):
                raise PlaneError(f"{exc}\nlogs in {self.log_dir}\n{logs}") from exc
            raise
        self.timings["total"] = time.monotonic() - begin
        return self

    def stop(self, keep_logs: bool = False) -> None:
        """Stops every component (TERM, then KILL after a grace period); removes the workdir unless kept."""
        if self.runner is not None:
            # Before the apiserver goes: the runner tears pods down itself, it needs no API for that.
            self.runner.stop()
        running = [c for c in self.components.values() if c.alive()]
        for component in running:
            component.signal(signal.SIGTERM)
        # Short grace: all state is throwaway, and a draining apiserver would add seconds to every session.
        deadline = time.monotonic() + 1
        for component in running:
            assert component.proc is not None
            try:
                component.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                component.signal(signal.SIGKILL)
                component.proc.wait(timeout=5)
        if self.owns_network:
            network.release()
            self.owns_network = False
        if not keep_logs:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(keep_logs=exc[0] is not None)

    def dead_components(self) -> list[str]:
        dead = [name for name, c in self.components.items() if not c.alive()]
        if self.runner is not None and not self.runner.alive():
            dead.append("pod-runner")
        return dead

    @property
    def hosts_file(self) -> Path:
        """The hosts file with the cluster names (see :func:`podrunner.with_cluster_hosts`)."""
        return self.hosts_path

    def check_alive(self) -> None:
        """Raises :class:`PlaneError` (with the dead component's log) if any component has exited."""
        dead = self.dead_components()
        if dead:
            tails = "\n".join(self._tail_block(name, 60) for name in dead)
            raise PlaneError(f"control-plane component(s) exited: {', '.join(dead)}\n{tails}")

    def kill_apiserver(self) -> None:
        """SIGKILLs the kube-apiserver (no graceful drain: every watch and connection just breaks).

        etcd keeps the data and every other component keeps running, retrying; :meth:`start_apiserver`
        brings it back on the same address with the same certificates and tokens.
        """
        apiserver = self.components[APISERVER]
        assert apiserver.proc is not None, "plane not started"
        apiserver.signal(signal.SIGKILL)
        apiserver.proc.wait(timeout=10)

    def start_apiserver(self) -> float:
        """Starts the kube-apiserver again after :meth:`kill_apiserver`; returns the seconds until /readyz."""
        assert not self.components[APISERVER].alive(), "kube-apiserver is running"
        start = time.monotonic()
        self._start_apiserver()
        return time.monotonic() - start

    def log_tails(self, lines: int = 40) -> str:
        return "\n".join(self._tail_block(name, lines) for name in self.components)

    def api_client(self) -> client.ApiClient:
        """A fresh ``kubernetes.client.ApiClient`` authenticated as the admin (system:masters)."""
        return api_client_from_kubeconfig(self.admin_kubeconfig)

    def kubeconfig_for_token(self, path: Path, user: str, token: str) -> Path:
        return write_kubeconfig(path, self.server, self.ca_pem, user, token)

    def mint_kubeconfig(
        self,
        namespace: str,
        service_account: str,
        *,
        path: Path | None = None,
        expiration_seconds: int = 3600,
    ) -> Path:
        """Writes a kubeconfig that authenticates as ``system:serviceaccount:<namespace>:<service_account>``.

        Creates the ServiceAccount if it does not exist and gets a token from the TokenRequest API (the
        way kubelets get projected tokens). The kubeconfig carries no permission beyond what RBAC grants
        the account; bind roles before or after minting, RBAC is evaluated per request.
        """
        path = path or self.workdir / "minted" / f"{namespace}.{service_account}.kubeconfig"
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.api_client() as api:
            token = request_token(client.CoreV1Api(api), namespace, service_account, expiration_seconds)
        return self.kubeconfig_for_token(path, f"{namespace}:{service_account}", token)

    # ---- startup steps

    def _timed(self, name: str, step: Callable[[], None]) -> None:
        start = time.monotonic()
        step()
        self.timings[name] = time.monotonic() - start

    def _tail_block(self, name: str, lines: int) -> str:
        if name not in self.components:
            return f"----- {name} exited"
        component = self.components[name]
        state = "running" if component.alive() else f"exited {component.proc and component.proc.returncode}"
        return f"----- {name} ({state}), last {lines} lines of {component.log} -----\n{component.tail(lines)}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        component = Component(name=name, argv=argv, log=self.log_dir / f"{name}.log", env=env or {})
        self.components[name] = component
        component.start()
        return component

    def _own_network(self) -> None:
        try:
            network.acquire()
        except network.NetworkUnavailable as exc:
            raise NetworkUnavailable(str(exc)) from exc
        self.owns_network = True

    def _start_runner(self) -> None:
        handler = logging.FileHandler(self.log_dir / "pod-runner.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(message)s"))
        runner_log = logging.getLogger("podrunner")
        runner_log.addHandler(handler)
        runner_log.setLevel(logging.INFO)
        self.runner = PodRunner(
            api_factory=self.api_client,
            namespaces=(self.ray_namespace,),
            nodes=(CPU_NODE, GPU_NODE),
            workdir=self.workdir / "podrunner",
            environment=lambda: serving_env.install(log=self.log_dir / "serving-env.log"),
            hosts=self.cluster_hosts,
            extra_env=POD_NODE_ENV,
            api_server=self.server,
            ca_cert=self.creds.ca_cert if self.creds else None,
        ).start()

    def _prepare(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.hosts_path.parent.mkdir(parents=True, exist_ok=True)
        self.cluster_hosts = ClusterHosts(self.hosts_path)
        self.creds = make_credentials(self.workdir / "pki")
        # On the host's bridge address, which host processes reach locally and pods through their
        # gateway: in-cluster clients (KubeRay's autoscaler) call the apiserver as in any cluster.
        self.server = f"https://{network.BRIDGE_IP}:{free_port()}"
        for user, token in self.creds.tokens.items():
            name = "admin.kubeconfig" if user == "admin" else f"{user}.kubeconfig"
            write_kubeconfig(self.workdir / name, self.server, self.ca_pem, user, token)

    def _kubeconfig_of(self, user: str) -> str:
        return str(self.workdir / f"{user}.kubeconfig")

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        self._spawn(
            "etcd",
            [
                str(self.tools.etcd),
                "--name=plane",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=plane={peer_url}",
                # Throwaway data: fsync would only make every write wait for the disk.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self.etcd_url = url
        wait_for(
            "etcd /health", lambda: http_ok(f"{url}/health"), self.startup_timeout, watch=self.check_alive
        )

    def _start_apiserver(self) -> None:
        assert self.creds is not None
        c = self.creds
        port = self.server.rsplit(":", 1)[1]
        self._spawn(
            APISERVER,
            [
                str(self.tools.kube),
                "kube-apiserver",
                f"--etcd-servers={self.etcd_url}",
                f"--bind-address={network.BRIDGE_IP}",
                f"--advertise-address={network.BRIDGE_IP}",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={c.serving_cert}",
                f"--tls-private-key-file={c.serving_key}",
                f"--client-ca-file={c.ca_cert}",
                f"--token-auth-file={c.token_file}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={c.sa_pub}",
                f"--service-account-signing-key-file={c.sa_key}",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Pods would otherwise wait for the controller-manager to create each namespace's
                # `default` ServiceAccount (envtest does the same).
                "--disable-admission-plugins=ServiceAccount",
                # The `kubernetes` Service's cluster IP is not routed here: pods get the apiserver's own
                # address in their environment instead (the pod runner), and no Endpoints are needed.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
            ],
        )
        context = ssl.create_default_context(cafile=str(c.ca_cert))
        admin = c.tokens["admin"]
        wait_for(
            "kube-apiserver /readyz",
            lambda: http_ok(f"{self.server}/readyz", context, admin),
            self.startup_timeout,
            watch=self.check_alive,
        )

    def _start_scheduler_and_kwok(self) -> None:
        self.scheduler_port = free_port()
        self._spawn(
            "kube-scheduler",
            [
                str(self.tools.kube),
                "kube-scheduler",
                f"--kubeconfig={self._kubeconfig_of('kube-scheduler')}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.scheduler_port}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
            ],
        )
        stages = [str(self.tools.kwok_module / stage) for stage in KWOK_STAGES]
        stages += [
            str(p)
            for p in write_pod_stages(
                self.tools, self.workdir / "kwok", (self.ray_namespace, self.kuberay_namespace)
            )
        ]
        self._spawn(
            "kwok",
            [
                str(self.tools.kwok),
                f"--kubeconfig={self._kubeconfig_of('kwok')}",
                *(f"--config={stage}" for stage in stages),
                "--manage-all-nodes=true",
                f"--cidr={POD_CIDR}",
                f"--node-ip={network.NODE_IP}",
            ],
        )

    def _start_controller_manager_and_kuberay(self) -> None:
        assert self.creds is not None
        self.controller_manager_port = free_port()
        # Started after the CRDs exist, so the garbage collector knows custom kinds from its first
        # discovery instead of 30 s later.
        self._spawn(
            "kube-controller-manager",
            [
                str(self.tools.kube),
                "kube-controller-manager",
                f"--kubeconfig={self._kubeconfig_of('kube-controller-manager')}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.controller_manager_port}",
                f"--cert-dir={self.workdir / 'controller-manager-certs'}",
                f"--service-account-private-key-file={self.creds.sa_key}",
                f"--root-ca-file={self.creds.ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # KWOK renews node heartbeats late now and then (about every 55 s all nodes went
                # NotReady for a moment), and the node lifecycle controller then marks every pod on them
                # NotReady, which empties Services until the pod runner writes Ready back: client failures
                # no real cluster would cause. The controller stays (it lifts the new nodes' not-ready
                # taint) but gives heartbeats an hour.
                "--node-monitor-grace-period=1h",
            ],
        )
        self.kuberay_probe_port = free_port()
        self._spawn(
            "kuberay-operator",
            # Its own /etc/hosts: KubeRay calls `<cluster>-head-svc.<ns>.svc.cluster.local`.
            with_cluster_hosts(self._kuberay_argv(), self.hosts_path),
            env={"KUBECONFIG": self._kubeconfig_of("kuberay-operator")},
        )

    @property
    def hosts_path(self) -> Path:
        return self.workdir / "podrunner" / "hosts"

    def _kuberay_argv(self) -> list[str]:
        return [
            str(self.tools.kuberay),
            f"--watch-namespace={self.kuberay_namespace},{self.ray_namespace}",
            "--enable-leader-election=false",
            "--metrics-addr=0",
            f"--health-probe-bind-address=127.0.0.1:{self.kuberay_probe_port}",
            "--log-stdout-encoder=console",
        ]

    def _seed_api(self) -> None:
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            for namespace in (self.kuberay_namespace, self.ray_namespace):
                core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
            for node in (cpu_node(), gpu_node()):
                core.create_node(node)
            names = create_crds(api, self._crd_documents())
            wait_for(
                "CRDs Established",
                lambda: all(crd_established(api, n) for n in names),
                self.startup_timeout,
                watch=self.check_alive,
            )

    def _crd_documents(self) -> list[dict[str, Any]]:
        kuberay = [self.tools.kuberay_crd_dir / f"ray.io_{plural}.yaml" for plural in KUBERAY_CRDS]
        docs: list[dict[str, Any]] = []
        for path in [*kuberay, *self.crd_files]:
            # libyaml: the pure-Python loader takes ~20 s for KubeRay's 3 MB of schemas.
            loaded = yaml.load_all(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            docs += [d for d in loaded if d and d.get("kind") == "CustomResourceDefinition"]
        return docs

    def _wait_components(self) -> None:
        insecure = insecure_context()
        probes = {
            "kube-scheduler": f"https://127.0.0.1:{self.scheduler_port}/healthz",
            "kube-controller-manager": f"https://127.0.0.1:{self.controller_manager_port}/healthz",
            "kuberay-operator": f"http://127.0.0.1:{self.kuberay_probe_port}/readyz",
        }
        for name, url in probes.items():
            context = insecure if url.startswith("https") else None
            wait_for(f"{name} {url}", _probe(url, context), self.startup_timeout, watch=self.check_alive)
        with self.api_client() as api:
            wait_for(
                "KWOK nodes Ready",
                lambda: nodes_ready(api, [CPU_NODE, GPU_NODE]),
                self.startup_timeout,
                watch=self.check_alive,
            )


def _probe(url: str, context: ssl.SSLContext | None) -> Callable[[], bool]:
    return lambda: http_ok(url, context)


# --------------------------------------------------------------------------------------------------
# API helpers (also used by the fixtures)


def api_client_from_kubeconfig(path: Path) -> client.ApiClient:
    """A ``kubernetes.client.ApiClient`` for a kubeconfig file, without touching global config."""
    api: client.ApiClient = config.new_client_from_config(config_file=str(path))
    return api


def request_token(
    core: client.CoreV1Api, namespace: str, service_account: str, expiration_seconds: int
) -> str:
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=service_account))
    try:
        core.create_namespaced_service_account(namespace, account)
    except ApiException as exc:
        if exc.status != 409:  # already exists: fine
            raise
    return issue_token(core, namespace, service_account, expiration_seconds)


def cpu_node() -> client.V1Node:
    return _node(CPU_NODE, {}, [], {"cpu": "32", "memory": "128Gi", "pods": "110"})


def gpu_node() -> client.V1Node:
    labels = {GPU_PRODUCT_LABEL: GPU_PRODUCT, "nvidia.com/gpu.present": "true", "nvidia.com/gpu.count": "4"}
    resources = {"cpu": "16", "memory": "64Gi", "pods": "110", GPU_RESOURCE: "4"}
    taint = client.V1Taint(**GPU_TAINT)
    return _node(GPU_NODE, labels, [taint], resources)


def _node(
    name: str, labels: dict[str, str], taints: list[client.V1Taint], resources: dict[str, str]
) -> client.V1Node:
    base_labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
    }
    return client.V1Node(
        metadata=client.V1ObjectMeta(
            name=name,
            labels={**base_labels, **labels},
            annotations={"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
        ),
        spec=client.V1NodeSpec(taints=taints),
        # KWOK's node-initialize stage keeps a capacity given at creation.
        status=client.V1NodeStatus(capacity=resources, allocatable=resources),
    )


def create_crds(api: client.ApiClient, documents: list[dict[str, Any]]) -> list[str]:
    """Creates CRDs from plain dicts and returns their names.

    Through the generic custom-objects API, so the (over 1 MB) KubeRay schemas go to the server byte for
    byte instead of through the client's typed models; and by create, since client-side apply would not
    fit them in its last-applied annotation.
    """
    objects = client.CustomObjectsApi(api)
    names = []
    for doc in documents:
        name = doc["metadata"]["name"]
        try:
            objects.create_cluster_custom_object(CRD_GROUP, "v1", "customresourcedefinitions", doc)
        except ApiException as exc:
            raise PlaneError(f"CRD {name} refused by the apiserver ({exc.status}): {exc.body}") from exc
        names.append(name)
    return names


def crd_established(api: client.ApiClient, name: str) -> bool:
    crd: Any = client.CustomObjectsApi(api).get_cluster_custom_object(
        CRD_GROUP, "v1", "customresourcedefinitions", name
    )
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


def nodes_ready(api: client.ApiClient, names: list[str]) -> bool:
    core = client.CoreV1Api(api)
    for name in names:
        status = core.read_node(name).status
        conditions = (status and status.conditions) or []
        if not any(c.type == "Ready" and c.status == "True" for c in conditions):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Manual use: python -m tests.k8s.plane


def _print_started(plane: ControlPlane) -> None:
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in plane.timings.items())
    print(f"control plane up ({timings})")
    print(f"  kubeconfig: {plane.admin_kubeconfig}")
    print(f"  export KUBECONFIG={plane.admin_kubeconfig}")
    print(f"  KubeRay watches namespace {plane.kuberay_namespace}; nodes {CPU_NODE}, {GPU_NODE}")
    print(f"  logs: {plane.log_dir}")
    print("Ctrl-C stops it.", flush=True)


def _wait_for_signal(plane: ControlPlane) -> None:
    stop = False

    def handler(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    reported: set[str] = set()
    while not stop:
        for name in set(plane.dead_components()) - reported:
            print(f"warning: {name} exited; see {plane.log_dir / (name + '.log')}", file=sys.stderr)
            reported.add(name)
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.k8s.plane", description=__doc__.split("\n")[0])
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory after stopping")
    parser.add_argument("--json", action="store_true", help="print startup timings as JSON and exit")
    args = parser.parse_args(argv)
    try:
        plane = ControlPlane(tools=find_tools()).start()
    except PlaneError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        if args.json:
            print(json.dumps({k: round(v, 2) for k, v in plane.timings.items()}))
        else:
            _print_started(plane)
            _wait_for_signal(plane)
    finally:
        plane.stop(keep_logs=args.keep_logs)
        print("control plane stopped" + (f"; logs kept in {plane.log_dir}" if args.keep_logs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
