"""The plane's address ranges: owned on this machine while a plane runs, so no test packet leaves it.

Only routing decisions are asked (`ip route get`): nothing is sent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.k8s import network

# The plane's own machinery (root, network namespaces, the host's routing table): it runs with the plane.
pytestmark = pytest.mark.k8s


def _route(*args: str) -> str:
    done = subprocess.run(["ip", "route", "get", *args], capture_output=True, text=True, timeout=10)
    return (done.stdout + done.stderr).strip()


def _unreachable(answer: str) -> bool:
    # An `unreachable` route answers EHOSTUNREACH ("No route to host"); ENETUNREACH for policy tables.
    return "no route to host" in answer.lower() or "unreachable" in answer.lower()


@pytest.fixture
def owned_ranges() -> Iterator[None]:
    try:
        network.check_capable()
    except network.NetworkUnavailable as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: {exc}", pytrace=False)
        pytest.skip(str(exc))
    network.acquire()
    yield
    network.release()


def test_cluster_addresses_stay_on_this_machine(owned_ranges: None) -> None:
    pod = _route("10.244.3.7")
    assert f"dev {network.BRIDGE}" in pod and "via" not in pod, pod
    for address in ("10.96.0.1", "10.96.12.34", network.NODE_IP):
        assert _unreachable(_route(address)), (address, _route(address))
    # What a pod sends beyond the bridge is not forwarded anywhere, even with forwarding on.
    beyond = _route("192.0.2.55", "from", "10.244.3.7", "iif", network.BRIDGE)
    assert _unreachable(beyond), beyond
    # The host's own address on the bridge (where pods reach host services) is local.
    assert _route(network.BRIDGE_IP).startswith("local"), _route(network.BRIDGE_IP)


def test_a_killed_planes_leftovers_are_removed_at_the_next_start(owned_ranges: None) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = f"{network.netns_prefix(dead.pid)}deadbeef"
    network.ip("netns", "add", leftover)
    (network.OWNERS_DIR / str(dead.pid)).touch()
    (network.NETNS_ETC / leftover).mkdir(parents=True, exist_ok=True)
    try:
        network.acquire()  # what the next plane's start does
        network.release()
        assert leftover not in network.list_namespaces()
        assert not (network.NETNS_ETC / leftover).exists()
        assert not (network.OWNERS_DIR / str(dead.pid)).exists()
    finally:
        network.ip("netns", "delete", leftover, check=False)


def test_ranges_are_released_by_the_last_owner() -> None:
    try:
        network.check_capable()
    except network.NetworkUnavailable as exc:
        pytest.skip(str(exc))
    had_mount_point = network.SERVICE_ACCOUNT_MOUNT.exists()  # a host that is itself a pod has one
    network.acquire()
    assert network.owned()
    assert network.SERVICE_ACCOUNT_MOUNT.is_dir()
    network.release()
    others = [int(p.name) for p in network.OWNERS_DIR.iterdir() if p.name.isdigit()]
    if network._held or any(network._alive(pid) for pid in others):
        # Not the last owner (this session's plane, or another session's, still runs): the ranges stay.
        assert network.owned()
        return
    assert not network.owned()
    assert network.BRIDGE not in network.ip("-br", "link").stdout
    assert network.SERVICE_ACCOUNT_MOUNT.exists() == had_mount_point
