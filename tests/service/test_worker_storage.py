"""app/storage.py: publishing is all-or-nothing, idempotent, and only the four names exist."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.core.config import Settings
from app.storage import ArtifactStore, StorageError

JOB = "0123456789abcdef0123456789abcdef"


def _artifact(directory: Path, **extra: bytes) -> dict[str, bytes]:
    files = {
        "model.safetensors": b"weights",
        "manifest.json": b"{}",
        "report.json": b"{}",
        "calibration.png": b"png",
    } | extra
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(Settings(data_dir=tmp_path / "data"))


def test_publish_moves_and_checksums(store: ArtifactStore) -> None:
    src = store.staging_dir(JOB)
    files = _artifact(src)
    listed = store.publish(JOB, src)
    assert {f.name for f in listed} == set(files)
    for f in listed:
        assert f.sha256 == hashlib.sha256(files[f.name]).hexdigest()
        assert f.size_bytes == len(files[f.name])
        assert store.path(JOB, f.name).read_bytes() == files[f.name]
    assert not src.exists()
    assert store.files(JOB) == listed


def test_publish_is_idempotent_for_a_redelivered_task(store: ArtifactStore) -> None:
    _artifact(store.staging_dir(JOB), **{"model.safetensors": b"first attempt"})
    store.publish(JOB, store.staging_dir(JOB))
    _artifact(store.staging_dir(JOB), **{"model.safetensors": b"second"})
    listed = store.publish(JOB, store.staging_dir(JOB))
    assert store.path(JOB, "model.safetensors").read_bytes() == b"second"
    # Re-publishing after the move (the worker died before committing) lists what is there.
    assert store.publish(JOB, store.staging_dir(JOB)) == listed
    assert sorted(p.name for p in store.root.iterdir()) == [".staging", JOB]
    assert list((store.root / ".staging").iterdir()) == []


def test_publish_from_another_directory_copies_then_renames(
    store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "elsewhere"
    _artifact(src)
    store.publish(JOB, src)
    assert store.path(JOB, "report.json").is_file()
    assert not src.exists()


@pytest.mark.parametrize("bad", [{"evil.sh": b"#!"}, {"model.safetensors.tmp": b""}, {"..": b""}])
def test_publish_rejects_unknown_files_and_publishes_nothing(
    store: ArtifactStore, bad: dict[str, bytes]
) -> None:
    src = store.staging_dir(JOB)
    if ".." in bad:
        _artifact(src)
        (src / "sub").mkdir()  # a directory is not an artifact either
    else:
        _artifact(src, **bad)
    with pytest.raises(StorageError):
        store.publish(JOB, src)
    assert not (store.root / JOB).exists()


def test_publish_rejects_an_incomplete_artifact(store: ArtifactStore) -> None:
    src = store.staging_dir(JOB)
    _artifact(src)
    (src / "model.safetensors").unlink()
    with pytest.raises(StorageError, match=r"model\.safetensors"):
        store.publish(JOB, src)
    assert not (store.root / JOB).exists()


@pytest.mark.parametrize(
    "name", ["../../etc/passwd", "model.safetensors/..", "", "MODEL.safetensors", "x"]
)
def test_path_accepts_only_artifact_names(store: ArtifactStore, name: str) -> None:
    with pytest.raises(KeyError):
        store.path(JOB, name)


@pytest.mark.parametrize("job_id", ["../x", "a/b", "", ".", "x" * 65])
def test_job_ids_never_become_paths(store: ArtifactStore, job_id: str) -> None:
    with pytest.raises(ValueError):
        store.path(job_id, "model.safetensors")
    with pytest.raises(ValueError):
        store.delete(job_id)


def test_delete(store: ArtifactStore) -> None:
    _artifact(store.staging_dir(JOB))
    store.publish(JOB, store.staging_dir(JOB))
    store.delete(JOB)
    assert not (store.root / JOB).exists()


def test_delete_is_idempotent_sweeps_leftovers_and_spares_open_files(store: ArtifactStore) -> None:
    """An open download keeps reading after the delete; trash an interrupted delete left and
    staging leftovers go too; a second delete is a no-op."""
    files = _artifact(store.staging_dir(JOB))
    store.publish(JOB, store.staging_dir(JOB))
    leftover = store.root / ".staging" / f".trash-{JOB}-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"old")
    _artifact(store.staging_dir(JOB))  # a late attempt's staging dir
    with store.open(JOB, "model.safetensors") as f:
        store.delete(JOB)
        assert f.read() == files["model.safetensors"]
    assert not (store.root / JOB).exists()
    assert list((store.root / ".staging").iterdir()) == []
    with pytest.raises(FileNotFoundError):
        store.open(JOB, "model.safetensors")
    store.delete(JOB)
