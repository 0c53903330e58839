"""How local mode starts Ray, checked without starting it (local_ray's pure parts)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from regserve_operator.local_ray import (
    IngressMode,
    RayPorts,
    ray_environment,
    ray_start_command,
    wanted_ingress_mode,
    write_auth_token,
)
from regserve_operator.sandbox.processes import free_port

# Ray's own fixed defaults for ports local mode moves: a local cluster must not take any of them.
RAY_FIXED_PORTS = {8404, 9101, 8500, 9500, 10001, 52365, 44217, 44227}


def test_start_command_and_env_keep_ray_on_loopback_and_off_fixed_ports(tmp_path: Path) -> None:
    ports = RayPorts(dashboard=free_port())
    command = ray_start_command(ports, num_cpus=2, temp_dir=tmp_path)
    assert {"--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp_path}"} <= set(
        command
    )
    modes: list[tuple[IngressMode, str]] = [("haproxy", "1"), ("proxy", "0")]
    for mode, flag in modes:
        env = ray_environment(mode, ports, tmp_path, auth_token="t0ken")
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == flag
        assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"
        with_metrics = ray_environment(mode, ports, tmp_path, auth_token="t0ken", ingress_metrics=True)
        assert with_metrics["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "1"
        # Without it `ray start` swaps the loopback node IP for the machine's external address.
        assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
        haproxy_files = [
            v for k, v in env.items() if "HAPROXY" in k and not k.endswith(("_PORT", "_ENABLED"))
        ]
        assert haproxy_files and all(path.startswith(str(tmp_path)) for path in haproxy_files)
        numbers = {int(value) for key, value in env.items() if key.endswith("_PORT")}
        assert numbers and not numbers & RAY_FIXED_PORTS
        # Token auth on, whatever this process's env or ~/.ray says; the token never on the command line.
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", "t0ken")
        assert env["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "auth_token")
        assert not any("t0ken" in arg for arg in command)


def test_the_token_is_fresh_and_readable_by_its_owner_only(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    token = write_auth_token(first)
    assert len(token) == 64 and token != write_auth_token(second)
    path = first / "auth_token"
    assert path.read_text() == token and stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("modes", "chosen", "warned"),
    [
        ([], "haproxy", False),
        (["haproxy"], "haproxy", False),
        (["proxy"], "proxy", False),
        (["haproxy", "haproxy"], "haproxy", False),
        (["haproxy", "proxy"], "proxy", True),
    ],
)
def test_one_cluster_one_ingress_mode(
    modes: list[IngressMode], chosen: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="regserve.dev"):
        assert wanted_ingress_mode(modes) == chosen
    assert ("different ingress modes" in caplog.text) is warned
