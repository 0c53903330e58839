"""A registry-reading child process gets no environment from a tenant's Secret (serving_app.child_env)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer

from serving_app import child_env
from serving_app.mlmodel_client import read_in_child
from tests.operator.mlflow_fixture import log_version


@dataclass(frozen=True)
class SplitCase:
    name: str
    secret: dict[str, str]
    allowed: dict[str, str]
    ignored: tuple[str, ...]


SPLIT_CASES = [
    SplitCase("empty", {}, {}, ()),
    SplitCase(
        "mlflow token and S3 keys pass",
        {"MLFLOW_TRACKING_TOKEN": "t", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"},
        {"MLFLOW_TRACKING_TOKEN": "t", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"},
        (),
    ),
    SplitCase(
        "interpreter and loader settings are ignored",
        {"PYTHONPATH": "/x", "LD_PRELOAD": "/x.so", "PYTHONHOME": "/x", "PYTHONSTARTUP": "/x"},
        {},
        ("LD_PRELOAD", "PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP"),
    ),
    SplitCase(
        "where the child writes and reads its configuration is ignored",
        {"HOME": "/x", "TMPDIR": "/x", "XDG_CONFIG_HOME": "/x"},
        {},
        ("HOME", "TMPDIR", "XDG_CONFIG_HOME"),
    ),
    SplitCase(
        "proxies are ignored",
        {"HTTP_PROXY": "http://p", "https_proxy": "http://p", "NO_PROXY": "*"},
        {},
        ("HTTP_PROXY", "NO_PROXY", "https_proxy"),
    ),
    SplitCase(
        "cloud settings that run commands, read files or borrow identities are ignored",
        {
            "AWS_CONFIG_FILE": "/x",
            "AWS_SHARED_CREDENTIALS_FILE": "/x",
            "AWS_PROFILE": "p",
            "AWS_ROLE_ARN": "arn",
            "AWS_WEB_IDENTITY_TOKEN_FILE": "/x",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://x",
            "GOOGLE_APPLICATION_CREDENTIALS": "/x",
            "MLFLOW_TRACKING_AUTH": "plugin",
            "MLFLOW_TRACKING_CLIENT_CERT_PATH": "/x",
        },
        {},
        (
            "AWS_CONFIG_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_PROFILE",
            "AWS_ROLE_ARN",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "GOOGLE_APPLICATION_CREDENTIALS",
            "MLFLOW_TRACKING_AUTH",
            "MLFLOW_TRACKING_CLIENT_CERT_PATH",
        ),
    ),
    SplitCase(
        "names are matched exactly, not by case or prefix",
        {"mlflow_tracking_token": "t", "MLFLOW_TRACKING_TOKEN_X": "t", "AZURE_STORAGE_SAS_TOKEN": "s"},
        {"AZURE_STORAGE_SAS_TOKEN": "s"},
        ("MLFLOW_TRACKING_TOKEN_X", "mlflow_tracking_token"),
    ),
    SplitCase(
        "oversized and NUL-bearing values are ignored",
        {"MLFLOW_TRACKING_TOKEN": "t" * (child_env.MAX_VALUE_BYTES + 1), "AWS_SESSION_TOKEN": "a\0b"},
        {},
        ("AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN"),
    ),
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda case: case.name)
def test_split(case: SplitCase) -> None:
    got = child_env.split(case.secret)
    assert dict(got.allowed) == case.allowed
    assert got.ignored == case.ignored


def test_child_environment_is_whole_and_fixed_values_win() -> None:
    env = child_env.child_environment(
        {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_S3_ENDPOINT_URL": "http://s3", "PATH": "/evil"},
        path="/usr/bin",
        home="/tmp/h",
        fixed={"MLFLOW_TRACKING_URI": "http://mlflow", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
    )
    assert env["PATH"] == "/usr/bin"
    assert env["HOME"] == env["TMPDIR"] == "/tmp/h"
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert env["MLFLOW_TRACKING_TOKEN"] == "t"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow"
    operator_only = set(os.environ) - set(env)
    assert operator_only, "the operator's own environment must not be inherited"


# ------------------------------------------------------------------------------ a real child process

SITECUSTOMIZE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"
PRELOAD_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void mark(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def version(mlflow_server: MlflowServer) -> str:
    return log_version(mlflow_server.url, "child_env_model", {"x": "double"})


@pytest.fixture
def traps(tmp_path: Path) -> dict[str, Path]:
    """A directory with a sitecustomize.py and a shared object that each leave a marker when they run."""
    site = tmp_path / "site"
    site.mkdir()
    markers = {"sitecustomize": tmp_path / "sitecustomize.ran", "preload": tmp_path / "preload.ran"}
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(marker=str(markers["sitecustomize"])))
    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler, "a C compiler builds the LD_PRELOAD trap"
    source = tmp_path / "mark.c"
    source.write_text(PRELOAD_C % markers["preload"])
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(tmp_path / "mark.so"), str(source)], check=True, timeout=60
    )
    home = tmp_path / "home"
    home.mkdir()
    return {"site": site, "so": tmp_path / "mark.so", "home": home, **markers}


def test_the_traps_work_when_the_environment_is_inherited(traps: dict[str, Path]) -> None:
    """The control: a child that does inherit these keys runs both traps."""
    env = {**os.environ, "PYTHONPATH": str(traps["site"]), "LD_PRELOAD": str(traps["so"])}
    subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
    assert traps["sitecustomize"].exists()
    assert traps["preload"].exists()


def test_no_secret_key_outside_the_allowlist_reaches_the_child(
    mlflow_server: MlflowServer, version: str, traps: dict[str, Path]
) -> None:
    hostile = {
        "PYTHONPATH": str(traps["site"]),
        "LD_PRELOAD": str(traps["so"]),
        "PYTHONHOME": "/nonexistent",  # python would not even start with it
        "HOME": str(traps["home"]),
        "TMPDIR": str(traps["home"]),
        "HTTP_PROXY": "http://127.0.0.1:9",  # every request would fail through it
        "http_proxy": "http://127.0.0.1:9",
    }
    found = read_in_child(mlflow_server.url, "child_env_model", version, credentials=hostile)
    assert "python_function" in found.flavors
    assert not traps["sitecustomize"].exists()
    assert not traps["preload"].exists()
    assert list(traps["home"].iterdir()) == []
