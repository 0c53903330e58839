"""The Python environment the Ray processes behind the test plane's pods run from.

Installed the way the serving image installs it: the Dockerfile's own ``pip install`` line of the
``serving`` stage (same constraints, same extras), into a virtualenv cached under ``~/.cache`` and keyed
by what decides its contents (Dockerfile, constraints.txt, pyproject.toml's project table). A change
that breaks the image's install therefore breaks the tests that use it. The image copies the working
tree's code; the pods here import it from the working tree (``PYTHONPATH``), so a code change needs no
reinstall.

``python -m tests.k8s.serving_env`` installs it (or reports it cached) and prints its path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
PYTHON = os.environ.get("PYTHON", "python3.11")
# What the image's check after the install asserts, run the same way here.
SMOKE = "import ray, serving_app.app"
PROJECT = "regserve"
# Bumped when what the build leaves in the environment changes (2: the project's own code removed).
LAYOUT = 2


class ServingEnvError(RuntimeError):
    """The serving image's install command failed or could not be found in the Dockerfile."""


def serving_install_command(dockerfile: Path = DOCKERFILE) -> tuple[list[str], str]:
    """The ``pip install`` arguments of the serving stage, with ``EXTRAS`` at its default.

    Read from the Dockerfile rather than repeated here, so the tests install what the image installs.
    """
    text = dockerfile.read_text()
    stage = text.split(" AS serving", 1)
    if len(stage) != 2:
        raise ServingEnvError(f"{dockerfile}: no `AS serving` stage")
    body = stage[1]
    extras = re.search(r"^ARG EXTRAS=(\S+)", body, re.M)
    install = re.search(r"RUN pip install (.+?)(?:\s*\\?\n|\s*&&)", body)
    if not (extras and install):
        raise ServingEnvError(f"{dockerfile}: serving stage has no `ARG EXTRAS=` or `RUN pip install`")
    args = install.group(1).replace("${EXTRAS}", extras.group(1)).replace('"', "").split()
    return args, extras.group(1)


def cache_root() -> Path:
    return Path(os.environ.get("REGSERVE_SERVING_ENV_DIR", Path.home() / ".cache" / "regserve-serving-env"))


def env_key() -> str:
    """A hash of what decides the environment's contents: the constraints, the Dockerfile (its install
    command and base versions) and the parts of pyproject.toml an install reads (not tool settings, which
    change often and install nothing)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    install_inputs = {
        "build-system": project.get("build-system"),
        "project": project.get("project"),
        "layout": LAYOUT,
    }
    digest = hashlib.sha256(json.dumps(install_inputs, sort_keys=True).encode())
    for path in (DOCKERFILE, REPO_ROOT / "constraints.txt"):
        digest.update(b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def env_dir() -> Path:
    return cache_root() / env_key()


def ready(path: Path | None = None) -> bool:
    path = path or env_dir()
    return (path / ".complete").is_file()


def install(log: Path | None = None) -> Path:
    """Installs the environment unless cached; returns its directory.

    Built in place (a venv's scripts carry its absolute path, so it cannot be renamed afterwards) and
    marked complete last: a killed install leaves no marker and is redone. A file lock serialises
    concurrent callers.
    """
    target = env_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not ready(target):
            shutil.rmtree(target, ignore_errors=True)
            _build(target, log)
            _prune(keep=target)
    return target


def _prune(keep: Path) -> None:
    """Environments of older inputs are dead weight (about 1.5 GB each)."""
    for entry in keep.parent.iterdir():
        if entry.name.split(".")[0] != keep.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _build(target: Path, log: Path | None) -> None:
    args, _ = serving_install_command()
    out = log.open("ab") if log else None
    python = str(target / "bin" / "python")
    try:
        subprocess.run([PYTHON, "-m", "venv", str(target)], check=True, stdout=out, stderr=out)
        quiet = ["--disable-pip-version-check"]
        subprocess.run(
            [python, "-m", "pip", "install", *quiet, "-q", "-U", "pip"], check=True, stdout=out, stderr=out
        )
        # The image's command, run in a copy of what the image copies into its build directory.
        with tempfile.TemporaryDirectory(prefix="regserve-serving-src-") as src:
            for name in ("constraints.txt", "pyproject.toml", "README.md"):
                shutil.copy2(REPO_ROOT / name, Path(src) / name)
            for name in ("operator", "serving_app"):
                shutil.copytree(
                    REPO_ROOT / name, Path(src) / name, ignore=shutil.ignore_patterns("__pycache__")
                )
            subprocess.run(
                [python, "-m", "pip", "install", *quiet, *args], check=True, cwd=src, stdout=out, stderr=out
            )
        subprocess.run([python, "-c", SMOKE], check=True, cwd="/", stdout=out, stderr=out)
        # The pods import the project from the working tree (PYTHONPATH). An installed copy would be
        # a silent fallback to the code of whenever this environment was built, should the tree ever
        # be out of a pod's sight; without it that fails at once.
        subprocess.run(
            [python, "-m", "pip", "uninstall", *quiet, "-q", "-y", PROJECT],
            check=True,
            stdout=out,
            stderr=out,
        )
    except subprocess.CalledProcessError as exc:
        where = f"; see {log}" if log else ""
        raise ServingEnvError(f"serving environment install failed: {exc}{where}") from exc
    finally:
        if out:
            out.close()
    (target / ".complete").write_text(" ".join(args) + "\n")


def main() -> int:
    try:
        path = install(log=None)
    except ServingEnvError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
