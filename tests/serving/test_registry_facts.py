"""Version facts read over REST through a real `mlflow server`'s artifact proxy (the cold-load gate)."""

from __future__ import annotations

import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import free_port, wait_for

from serving_app.errors import RegistryUnavailable, UnknownVersion, VersionLoadFailed
from serving_app.examples import PHRASEBOOK_MODEL
from serving_app.mlmodel import RegistryAuth
from serving_app.proxy_download import download_over_rest
from serving_app.registry import ModelRegistry, configure_process

MODEL = "facts_model"


@pytest.fixture
def tracking(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    configure_process(mlflow_server.url)
    try:
        yield mlflow_server.url
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def registry(tracking: str) -> Iterator[ModelRegistry]:
    """The model's registry as a replica holds it."""
    owned = ModelRegistry(MODEL, tracking, RegistryAuth())
    try:
        yield owned
    finally:
        owned.close()


def artifact_dir(server: MlflowServer, version: str) -> Path:
    answer = httpx.get(
        f"{server.url}/api/2.0/mlflow/model-versions/get-download-uri",
        params={"name": MODEL, "version": version},
    )
    answer.raise_for_status()
    path = urllib.parse.urlparse(answer.json()["artifact_uri"]).path
    return server.root / "artifacts" / path.lstrip("/")


def test_rest_facts_match_mlflows_own_reading(tracking: str, registry: ModelRegistry) -> None:
    version = log_phrasebook(tracking, MODEL, lang_to="de")
    facts = registry.fetch_facts(version)
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{version}")
    assert facts.version == version
    assert facts.signature is not None and info.signature is not None
    assert facts.signature.to_dict() == info.signature.to_dict()
    assert facts.flavors == tuple(sorted(info.flavors))
    # The load that follows the gate reads the same artifacts and answers.
    loaded = registry.load(version)
    answer = loaded.model.predict([{"prompt": "Hello"}])
    assert [row["translation_text"] for row in answer] == ["Hallo"]


@pytest.mark.parametrize("model, version", [(MODEL, "999"), ("no_such_model", "1")])
def test_unknown_versions_are_unknown(tracking: str, model: str, version: str) -> None:
    log_phrasebook(tracking, MODEL, lang_to="de")
    registry = ModelRegistry(model, tracking, RegistryAuth())
    with pytest.raises(UnknownVersion):
        registry.fetch_facts(version)
    with pytest.raises(UnknownVersion):
        registry.load(version)


def test_missing_mlmodel_is_a_broken_version_not_an_unknown_one(
    tracking: str, mlflow_server: MlflowServer, registry: ModelRegistry
) -> None:
    version = log_phrasebook(tracking, MODEL, lang_to="fr")
    (artifact_dir(mlflow_server, version) / "MLmodel").unlink()
    with pytest.raises(VersionLoadFailed, match="no MLmodel"):
        registry.fetch_facts(version)
    with pytest.raises(VersionLoadFailed):
        registry.load(version)


def test_garbage_mlmodel_is_a_broken_version(
    tracking: str, mlflow_server: MlflowServer, registry: ModelRegistry
) -> None:
    version = log_phrasebook(tracking, MODEL, lang_to="fr")
    (artifact_dir(mlflow_server, version) / "MLmodel").write_text("just text, no mapping\n")
    with pytest.raises(VersionLoadFailed, match="no readable MLmodel"):
        registry.fetch_facts(version)


def test_unreachable_registry_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    configure_process(url)
    try:
        registry = ModelRegistry(MODEL, url, RegistryAuth())
        with pytest.raises(RegistryUnavailable):
            registry.fetch_facts("1")
        with pytest.raises(RegistryUnavailable):
            registry.load("1")
    finally:
        mlflow.set_tracking_uri(previous)


def test_prefetched_download_is_loaded_and_deleted_with_the_model(
    tracking: str, registry: ModelRegistry
) -> None:
    version = log_phrasebook(tracking, MODEL, lang_to="de")
    prefetches = registry.prefetches
    prefetches.start(version)
    loaded = registry.load(version)  # waits for the download and loads from it
    assert prefetches.pending() == 0
    assert loaded.local_dir is not None and Path(loaded.local_dir, "MLmodel").exists()
    answer = loaded.model.predict([{"prompt": "Hello"}])
    assert [row["translation_text"] for row in answer] == ["Hallo"]
    local_dir = loaded.local_dir
    loaded.release()
    assert not Path(local_dir).exists()


def test_discarded_download_is_deleted_when_it_finishes(tracking: str, registry: ModelRegistry) -> None:
    version = log_phrasebook(tracking, MODEL, lang_to="fr")
    before = set(Path(tempfile.gettempdir()).glob(f"regserve-v{version}-*"))
    registry.prefetches.start(version)
    registry.prefetches.discard(version)
    assert registry.prefetches.pending() == 0

    def leftovers() -> set[Path]:
        return set(Path(tempfile.gettempdir()).glob(f"regserve-v{version}-*")) - before

    # The download runs on; once it finishes, its directory goes.
    wait_for(lambda: not leftovers(), timeout=60, interval=0.1, message="discarded download deleted")
    # Loading afterwards fetches the version afresh (nothing stale is taken).
    loaded = registry.load(version)
    assert loaded.local_dir is not None and Path(loaded.local_dir, "MLmodel").exists()


def tree(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def test_proxy_download_writes_what_mlflow_downloads(tracking: str, tmp_path: Path) -> None:
    """Nested folders, names that need quoting and an empty file, byte for byte as the mlflow client."""
    glossary = tmp_path / "glossary"
    (glossary / "sub dir").mkdir(parents=True)
    (glossary / "sub dir" / "terms list+1.txt").write_text("Hello=Hallo\n")
    (glossary / "empty.bin").write_bytes(b"")
    (glossary / "weights.bin").write_bytes(bytes(range(256)) * 12_000)  # 3 MB: several chunks
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PHRASEBOOK_MODEL),
            model_config={"lang_to": "de", "input_label": "prompt", "fail_on_load": False},
            artifacts={"glossary": str(glossary)},
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=MODEL,
        )
    version = str(info.registered_model_version)
    ours = tmp_path / "ours"
    ours.mkdir()
    assert download_over_rest(tracking, MODEL, version, ours, auth=RegistryAuth())
    theirs = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{MODEL}/{version}", dst_path=str(tmp_path / "theirs")
        )
    )
    downloaded = tree(ours)
    assert downloaded == tree(theirs)
    assert downloaded["artifacts/glossary/sub dir/terms list+1.txt"] == b"Hello=Hallo\n"
    assert downloaded["artifacts/glossary/empty.bin"] == b""
    assert "MLmodel" in downloaded


def test_other_stores_are_left_to_the_mlflow_client(tmp_path: Path) -> None:
    for tracking_uri in ("sqlite:///nowhere.db", str(tmp_path / "mlruns"), "databricks"):
        assert not download_over_rest(tracking_uri, MODEL, "1", tmp_path, auth=RegistryAuth())
    assert list(tmp_path.iterdir()) == []
