"""Downloading a registry version's files through the tracking server's artifact proxy.

A first pinned request waits for its version's download. For a small model the mlflow client spends
most of it on client-side work (its own `models:/` resolution, a session and a progress bar per call):
about 70 ms for a five-file sklearn model, where the same requests over this replica's pooled
connection take a few. Locations outside this server's proxy are left to the mlflow client, by the
rule `serving_app.mlmodel` states. Nothing here imports mlflow.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path, PurePosixPath

import httpx
import yaml

from serving_app.mlmodel import (
    ARTIFACTS_PATH,
    RegistryAuth,
    Unreachable,
    Unreadable,
    get_answer,
    locate,
    models_uri,
    proxied_path,
    raise_for_answer,
)

CHUNK_BYTES = 1 << 20
REGISTERED_MODEL_META = "registered_model_meta"


def download_over_rest(
    tracking_uri: str,
    name: str,
    version: str,
    destination: Path,
    *,
    auth: RegistryAuth,
    transport: httpx.BaseTransport | None = None,
) -> bool:
    """Write every file of the version under `destination` (which holds its MLmodel then); False,
    writing nothing, when its artifacts are not behind this server's proxy. Failures are
    `serving_app.mlmodel`'s ReadErrors."""
    base = tracking_uri.rstrip("/")
    if not base.startswith(("http://", "https://")):
        return False
    uri = models_uri(name, version)
    with auth.client(base, transport) as client:
        quoted = proxied_path(locate(client, auth, name, version), base)
        if quoted is None:
            return False
        root = PurePosixPath(urllib.parse.unquote(quoted).lstrip("/"))
        for relative in _files(client, auth, uri, root, PurePosixPath()):
            _fetch(client, auth, uri, root / relative, destination.joinpath(*relative.parts))
    # What the mlflow client adds to a `models:/` download, so the two directories are the same.
    meta = {"model_name": name, "model_version": version}
    (destination / REGISTERED_MODEL_META).write_text(yaml.safe_dump(meta, default_flow_style=False))
    return True


def _files(
    client: httpx.Client, auth: RegistryAuth, uri: str, root: PurePosixPath, folder: PurePosixPath
) -> list[PurePosixPath]:
    """The files under `root / folder`, relative to `root`, depth first."""
    answer = get_answer(client, auth, uri, ARTIFACTS_PATH, {"path": str(root / folder)})
    try:
        entries = answer.json().get("files") or []
    except (ValueError, AttributeError) as error:
        raise Unreachable(f"{uri}: the artifact listing answered no MLflow JSON") from error
    found: list[PurePosixPath] = []
    for entry in entries:
        name = str(entry.get("path", ""))
        # The proxy lists base names; anything else could write outside the destination.
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise Unreadable(f"{uri}: the artifact listing names {name!r}")
        if entry.get("is_dir"):
            found.extend(_files(client, auth, uri, root, folder / name))
        else:
            found.append(folder / name)
    if not found and folder == PurePosixPath():
        raise Unreadable(f"{uri}: no artifacts")
    return found


def _fetch(client: httpx.Client, auth: RegistryAuth, uri: str, source: PurePosixPath, target: Path) -> None:
    path = f"{ARTIFACTS_PATH}/{urllib.parse.quote(str(source))}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with client.stream("GET", path) as answer:
            if answer.status_code != 200:
                answer.read()
                raise_for_answer(answer, auth, uri, path, missing=Unreadable)
            with target.open("wb") as sink:
                for chunk in answer.iter_bytes(CHUNK_BYTES):
                    sink.write(chunk)
    except httpx.HTTPError as error:
        raise Unreachable(f"{uri}: {type(error).__name__} while downloading {source.name}") from error
