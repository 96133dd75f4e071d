"""Where finished artifacts live: ``artifacts_dir/<job_id>/<name>``, the service's layout.

A job's files appear all at once or not at all: the pipeline writes them into a staging
directory on the same filesystem, they are checksummed and fsynced there, and one directory
rename publishes them. Only the four artifact names exist; a name is looked up in that list,
never joined onto a path, so nothing a client sends can reach another file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, NamedTuple

from app.core.config import Settings
from app.db.models import ARTIFACT_NAMES, ID_PATTERN
from d4c_core.vocabulary import REQUIRED_FILES as REQUIRED_NAMES

# Server-chosen ids are uuid4 hex; anything else is refused before it becomes a path.
_JOB_ID = re.compile(ID_PATTERN)


class StoredFile(NamedTuple):
    name: str
    size_bytes: int
    sha256: str


class StorageError(Exception):
    """An artifact directory is incomplete or holds a file that is not an artifact."""


def _job_dir_name(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id


def _checksum(path: Path) -> StoredFile:
    """sha256 and size of a file, flushed to disk first so the listed bytes are durable."""
    with path.open("rb") as f:
        os.fsync(f.fileno())
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return StoredFile(path.name, path.stat().st_size, digest)


def _rmtree(path: Path) -> None:
    """``shutil.rmtree`` where a tree already gone (or going: another purge) is no error."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtifactStore:
    """The artifact root of one deployment (``Settings.artifacts_dir``)."""

    def __init__(self, settings: Settings) -> None:
        self.root = Path(settings.artifacts_dir)

    @property
    def _staging_root(self) -> Path:
        return self.root / ".staging"

    def staging_dir(self, job_id: str, create_parent: bool = True) -> Path:
        """Where a worker has the pipeline write a job's files (same filesystem as the root,
        so publishing is a rename). The directory itself does not exist yet."""
        if create_parent:
            self._staging_root.mkdir(parents=True, exist_ok=True)
        return self._staging_root / _job_dir_name(job_id)

    def path(self, job_id: str, name: str) -> Path:
        """The file ``name`` of a published job; ``name`` must be one of ``ARTIFACT_NAMES``."""
        if name not in ARTIFACT_NAMES:
            raise KeyError(name)
        return self.root / _job_dir_name(job_id) / name

    def publish(self, job_id: str, src_dir: Path) -> list[StoredFile]:
        """Move a finished ``src_dir`` to the job's place; return each file's size and sha256.

        Idempotent for a redelivered task: a previous attempt's published files (never yet
        listed, as the job row commits only after this returns) are replaced as a whole.
        """
        final = self.root / _job_dir_name(job_id)
        src_dir = Path(src_dir)
        if not src_dir.is_dir() and final.is_dir():
            return self._listing(final)  # already moved by an attempt that died afterwards
        files = self._listing(src_dir)
        staged = src_dir
        if src_dir.parent.resolve() != self._staging_root.resolve():
            staged = self.staging_dir(f"{job_id}-{uuid.uuid4().hex[:8]}")
            shutil.copytree(src_dir, staged)  # another filesystem: copy, then rename
            self._listing(staged)
        _fsync_dir(staged)
        trash = None
        if final.exists():
            trash = self._staging_root / f".trash-{job_id}-{uuid.uuid4().hex[:8]}"
            final.rename(trash)
        staged.rename(final)
        _fsync_dir(self.root)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        if staged is not src_dir:
            shutil.rmtree(src_dir, ignore_errors=True)
        return files

    def files(self, job_id: str) -> list[StoredFile]:
        """Checksums of a published job's files (recomputed from disk)."""
        return self._listing(self.root / _job_dir_name(job_id))

    def open(self, job_id: str, name: str) -> BinaryIO:
        """Open a published file for reading (FileNotFoundError once it is deleted).

        A download serves from this open file rather than from its path: the descriptor
        keeps the whole file readable to the end even if ``delete`` runs meanwhile.
        """
        return self.path(job_id, name).open("rb")

    def delete(self, job_id: str) -> None:
        """Remove a job's published files and staging leftovers; idempotent.

        The published directory is renamed to a trash name first, one atomic step: a download
        that has not opened its file yet then finds none (a clean 410, never half a set),
        while one already streaming keeps its open descriptor, which survives the unlink.
        Trash an interrupted earlier call left behind is removed too. Errors other than
        "already gone" propagate, so a caller can tell a purge that did not happen.
        """
        name = _job_dir_name(job_id)
        final = self.root / name
        if final.exists():
            self._staging_root.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # a concurrent delete took it
                final.rename(self._staging_root / f".trash-{name}-{uuid.uuid4().hex[:8]}")
        if not self._staging_root.is_dir():
            return
        for leftover in self._staging_root.glob(f".trash-{name}-*"):
            _rmtree(leftover)
        _rmtree(self._staging_root / name)
        _rmtree(self._staging_root / f".{name}.tmp")

    @staticmethod
    def _listing(directory: Path) -> list[StoredFile]:
        """Every file of an artifact directory, refusing anything that is not an artifact."""
        if not directory.is_dir():
            raise StorageError(f"{directory.name}: no such artifact directory")
        entries = sorted(p for p in directory.iterdir())
        unknown = [p.name for p in entries if p.name not in ARTIFACT_NAMES or not p.is_file()]
        if unknown:
            raise StorageError(f"not an artifact file: {unknown[0]!r}")
        names = {p.name for p in entries}
        missing = [n for n in REQUIRED_NAMES if n not in names]
        if missing:
            raise StorageError(f"artifact incomplete: {missing[0]} is missing")
        return [_checksum(p) for p in entries]
