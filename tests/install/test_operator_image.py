"""The operator image's package list (deploy/docker/operator-requirements.txt) is enough to run it.

No Docker engine here, so the image is not built. Instead: the distributions the Dockerfile installs
(regserve itself with --no-deps, plus the list and everything those require) are computed from this
virtualenv's metadata, the operator's modules are imported in a fresh interpreter, and every imported
file from site-packages must belong to one of those distributions. A module that needs mlflow (full),
pandas, Ray, ... would show up here as a file owned by a distribution the image does not have.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.install.support import ROOT

REQUIREMENTS = ROOT / "deploy" / "docker" / "operator-requirements.txt"
# What `regserve run` loads: the CLI, kopf registration, reconcile with the Kubernetes target, the
# registry client, the webhook receiver (aiohttp.web, imported lazily) and the metrics endpoint.
OPERATOR_MODULES = (
    "regserve_operator.cli",
    "regserve_operator.main",
    "regserve_operator.reconcile",
    "regserve_operator.registry",
    "regserve_operator.targets.kube",
    "regserve_operator.webhook",
    "regserve_operator.metrics",
    "aiohttp.web",
)
# Imported only on demand: the facts fetch for artifacts outside the tracking server's proxy
# (registry.fetch_facts_with_mlflow) and `regserve webhook register`. These keep mlflow-skinny in the image.
ON_DEMAND_MODULES = ("mlflow.artifacts", "mlflow.models", "mlflow.tracking", "mlflow")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions() -> set[str]:
    wanted = [
        line.strip()
        for line in REQUIREMENTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    seen: set[str] = set()
    todo = [Requirement(w) for w in wanted]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.distribution(name).requires or []:
            sub = Requirement(text)
            # Extras the image does not ask for are not installed.
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return seen


# In every python:3.11 image, or regserve itself (installed editable here).
BASE = {"pip", "setuptools", "wheel", "regserve"}


def _owners() -> dict[str, set[str]]:
    """Resolved file path -> the distributions whose RECORD lists it."""
    owners: dict[str, set[str]] = {}
    for dist in metadata.distributions():
        name = _canonical(dist.metadata["Name"])
        for file in dist.files or []:
            owners.setdefault(str(Path(str(dist.locate_file(file))).resolve()), set()).add(name)
    return owners


def _image_site_packages(allowed: set[str], into: Path) -> None:
    """A site-packages holding (as symlinks) only the top-level entries of the image's distributions."""
    into.mkdir()
    for dist in metadata.distributions():
        if _canonical(dist.metadata["Name"]) not in allowed:
            continue
        for file in dist.files or []:
            top = file.parts[0] if file.parts else ""
            if not top or top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            source = Path(str(dist.locate_file(top)))
            link = into / top
            if source.exists() and not link.exists():
                link.symlink_to(source)


# Runs with `python -S` (no site-packages) and only the image's packages on the path, so a module the
# image lacks is simply not found, as there (mlflow's optional imports then take the image's path).
SCRIPT = """
import importlib, json, sys
for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
files = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
print(json.dumps(sorted(files)))
"""


def _import_with_only(site: Path, modules: tuple[str, ...], tmp_path: Path) -> list[str]:
    """Files from `site` that importing `modules` loads, in an interpreter that sees only `site`."""
    path = f"{site}:{ROOT / 'operator'}:{ROOT}"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", SCRIPT, json.dumps(modules)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
        env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [f for f in json.loads(proc.stdout.splitlines()[-1]) if f.startswith(str(site))]


def test_operator_runs_without_mlflow(tmp_path: Path) -> None:
    # The operator's own path reads the registry over REST: even without mlflow-skinny (and pandas,
    # which only mlflow needs) in the image, `regserve run` imports, and never touches mlflow.
    allowed = image_distributions() - {"mlflow-skinny", "pandas"} | BASE
    site = tmp_path / "site-packages"
    _image_site_packages(allowed, site)
    assert not (site / "mlflow").exists() and (site / "kopf").exists()
    files = _import_with_only(site, OPERATOR_MODULES, tmp_path)
    assert len(files) > 100
    assert not [f for f in files if "/mlflow/" in f or "/pandas/" in f or "/numpy/" in f]


@pytest.mark.slow  # imports the operator in a fresh interpreter
def test_operator_imports_come_only_from_the_images_distributions(tmp_path: Path) -> None:
    allowed = image_distributions() | BASE
    assert "mlflow-skinny" in allowed and "mlflow" not in allowed and "ray" not in allowed
    site = tmp_path / "site-packages"
    _image_site_packages(allowed, site)
    assert not (site / "sklearn").exists() and not (site / "ray").exists() and (site / "kopf").exists()
    files = _import_with_only(site, OPERATOR_MODULES + ON_DEMAND_MODULES, tmp_path)
    assert len(files) > 100
    owners = _owners()
    outside: dict[str, set[str]] = {}
    for file in files:
        dists = owners.get(str(Path(file).resolve()), set())
        if dists and not dists & allowed:
            outside.setdefault(",".join(sorted(dists)), set()).add(file)
    assert not outside, {k: sorted(v)[:3] for k, v in outside.items()}
