"""The test plane's address ranges, owned on this machine so that no test packet leaves it.

KubeRay health-checks pod addresses that KWOK invents (10.244.x.x); without this they would go out by the
default route. While a plane runs, the host holds:

- a bridge carrying the pod range (pods the runner starts plug a veth into it; an address nobody holds
  gets no ARP answer and stays on the bridge),
- ``unreachable`` routes for the service and node ranges, which nothing serves,
- a policy rule making anything that arrives from the bridge and is not for the host unroutable, so a pod
  cannot reach beyond the bridge even where IP forwarding is on.

Planes may run side by side (one per test session): the ranges are the same for all, so the setup is
shared and reference-counted by owner files named after each plane's pid. A plane that was killed leaves
its owner file; the next start sees the pid is gone, removes the file and everything the dead plane's pod
runner left (network namespaces, their processes), and tears the setup down when no owner is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

POD_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
NODE_CIDR = "10.240.0.0/16"
NODE_IP = "10.240.0.1"
BRIDGE = "rsplane0"
# The host's address on the bridge (the pods' gateway, where host services for pods listen). The top of
# the range: KWOK hands out pod addresses from the bottom, one by one.
BRIDGE_IP = str(ipaddress.ip_network(POD_CIDR).broadcast_address - 1)
POLICY_TABLE = "1244"
POLICY_PRIORITY = "1244"
STATE_DIR = Path(os.environ.get("REGSERVE_PLANE_STATE", "/run/regserve-plane"))
OWNERS_DIR = STATE_DIR / "owners"
LOCK_FILE = STATE_DIR / "lock"
# Network namespaces of the pod runner: `<NETNS_PREFIX><plane pid>-<pod uid prefix>`.
NETNS_PREFIX = "rsp"
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
# Where a kubelet projects a pod's service-account token; the pod runner bind-mounts each pod's own
# files there inside the pod, so the mount point must exist on the host while a plane runs.
SERVICE_ACCOUNT_MOUNT = Path("/run/secrets/kubernetes.io/serviceaccount")


class NetworkUnavailable(RuntimeError):
    """This machine does not let the plane own its address ranges (not root, no `ip`, no netns)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise NetworkUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def check_capable() -> None:
    """Raises :class:`NetworkUnavailable` with the reason if network namespaces cannot be made here."""
    if shutil.which("ip") is None:
        raise NetworkUnavailable("the `ip` command (iproute2) is not installed")
    if os.geteuid() != 0:
        raise NetworkUnavailable("the test plane needs root to own its address ranges and pod namespaces")
    probe = f"{NETNS_PREFIX}probe{os.getpid()}"
    made = ip("netns", "add", probe, check=False)
    ip("netns", "delete", probe, check=False)
    if made.returncode != 0:
        raise NetworkUnavailable(f"cannot create a network namespace: {made.stderr.strip()}")


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    OWNERS_DIR.mkdir(exist_ok=True)
    with LOCK_FILE.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_owners() -> list[int]:
    owners = []
    for entry in OWNERS_DIR.iterdir():
        pid = int(entry.name) if entry.name.isdigit() else -1
        if pid > 0 and _alive(pid):
            owners.append(pid)
        else:
            entry.unlink(missing_ok=True)
    return owners


# Acquisitions by this process (a test of this module and the session's plane may both hold them).
_held = 0


def acquire() -> None:
    """Owns the ranges for this process; cleans what dead planes left first."""
    global _held
    check_capable()
    with _locked():
        _held += 1
        owners = _live_owners()
        remove_dead_namespaces(owners)
        if not owners:
            _teardown()  # a killed run's leftovers: start from nothing
        _setup()
        (OWNERS_DIR / str(os.getpid())).touch()


def release() -> None:
    """Drops this process's ownership; the last owner removes the bridge, routes and rule."""
    global _held
    with _locked():
        _held = max(0, _held - 1)
        if _held:
            return
        (OWNERS_DIR / str(os.getpid())).unlink(missing_ok=True)
        owners = _live_owners()
        remove_dead_namespaces(owners)
        if not owners:
            _teardown()


def _setup() -> None:
    SERVICE_ACCOUNT_MOUNT.mkdir(parents=True, exist_ok=True)
    if ip("link", "show", BRIDGE, check=False).returncode != 0:
        ip("link", "add", BRIDGE, "type", "bridge")
    prefix = POD_CIDR.split("/")[1]
    ip("addr", "replace", f"{BRIDGE_IP}/{prefix}", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    for cidr in (SERVICE_CIDR, NODE_CIDR):
        ip("route", "replace", "unreachable", cidr)
    ip("route", "replace", POD_CIDR, "dev", BRIDGE, "src", BRIDGE_IP, "table", POLICY_TABLE)
    ip("route", "replace", "unreachable", "default", "table", POLICY_TABLE)
    if POLICY_PRIORITY not in ip("rule", "show", "priority", POLICY_PRIORITY).stdout:
        ip("rule", "add", "priority", POLICY_PRIORITY, "iif", BRIDGE, "lookup", POLICY_TABLE)


def _teardown() -> None:
    ip("rule", "delete", "priority", POLICY_PRIORITY, check=False)
    ip("route", "flush", "table", POLICY_TABLE, check=False)
    for cidr in (SERVICE_CIDR, NODE_CIDR):
        ip("route", "delete", "unreachable", cidr, check=False)
    ip("link", "delete", BRIDGE, check=False)
    # Only the empty directories the setup made: a host that has its own /run/secrets keeps it.
    for directory in (SERVICE_ACCOUNT_MOUNT, *list(SERVICE_ACCOUNT_MOUNT.parents)[:2]):
        with contextlib.suppress(OSError):
            directory.rmdir()


def owned() -> bool:
    """Whether the bridge and routes are in place (for tests and diagnostics)."""
    routes = ip("route", "show", "type", "unreachable", check=False).stdout
    bridge = ip("-br", "addr", "show", BRIDGE, check=False).stdout
    return SERVICE_CIDR in routes and NODE_CIDR in routes and BRIDGE_IP in bridge


# --------------------------------------------------------------------------------------------------
# Pod network namespaces (created by the pod runner, removed here when their plane is gone)


def netns_prefix(plane_pid: int) -> str:
    return f"{NETNS_PREFIX}{plane_pid}-"


def list_namespaces(prefix: str = NETNS_PREFIX) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))


def netns_pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout
    return [int(line) for line in out.split() if line.isdigit()]


def kill_namespace_processes(name: str, grace: float = 2.0) -> None:
    """TERM then KILL every process in the namespace (Ray starts some, HAProxy too, in other groups)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = netns_pids(name)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _alive(pid) and not _zombie(pid)]
            if pids:
                time.sleep(0.1)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True


def delete_namespace(name: str) -> None:
    """Kills its processes, deletes it (its veth pair goes with it) and its /etc/netns files."""
    kill_namespace_processes(name)
    ip("netns", "delete", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def remove_dead_namespaces(live_owners: list[int]) -> None:
    keep = tuple(netns_prefix(pid) for pid in live_owners)
    for name in list_namespaces():
        if not name.startswith(keep):
            delete_namespace(name)
    if NETNS_ETC.is_dir():
        for leftover in NETNS_ETC.iterdir():
            if leftover.name.startswith(NETNS_PREFIX) and not leftover.name.startswith(keep):
                shutil.rmtree(leftover, ignore_errors=True)
