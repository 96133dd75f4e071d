"""ORM models of the job service: tenants, API keys, uploaded checkpoints, jobs, artifacts.

The job row is the source of truth for a job's state; the broker only carries its id. Times
are timezone-aware UTC on every backend (SQLite stores them naive, ``UTCDateTime`` restores the
zone on the way out so API and worker compare like with like).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column

from app.db.base import Base
from d4c_core.vocabulary import ARTIFACT_FILES

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATES: tuple[str, ...] = get_args(JobState)
ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("succeeded", "failed", "cancelled")
ARTIFACT_NAMES = ARTIFACT_FILES
# Server-chosen ids (uuid4 hex; the storage layout allows this wider set). Anything else is
# refused before it reaches a query or becomes a path: PostgreSQL rejects NUL in text.
ID_PATTERN = r"^[0-9A-Za-z_-]{1,64}$"


def new_id() -> str:
    """A server-chosen id (uuid4 hex): never derived from anything a client sent."""
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that always hands back aware UTC datetimes (SQLite too)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """An API key, stored as its sha256 only; ``prefix`` lets an operator recognise it."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(8), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Checkpoint(Base):
    """An uploaded safetensors checkpoint; its file is ``checkpoints_dir / f"{id}.safetensors"``."""

    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    arch: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    """One quantization job. ``model`` and ``recipe`` are exactly what the worker runs."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key"),
        # GET /jobs: a tenant's jobs newest first, optionally by state.
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
        # The reaper's two deletion sweeps (app/deletion.py), run every few seconds by every
        # worker: finished jobs past retention (deleted_at IS NULL, finished_at < cutoff) and
        # tombstones whose files are not yet confirmed gone (purged_at IS NULL, deleted_at <
        # cutoff). Both are index range scans instead of a scan of the whole table.
        Index("ix_jobs_retention", "deleted_at", "finished_at"),
        Index("ix_jobs_unpurged", "purged_at", "deleted_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    # Indexed through ix_jobs_tenant_created, whose leading column it is.
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    stage: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    model: Mapped[dict[str, Any]] = mapped_column(JSONType)
    recipe: Mapped[dict[str, Any]] = mapped_column(JSONType)
    eval_task: Mapped[str | None] = mapped_column(String(100), nullable=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255), nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Tombstone: when the job's artifacts and work dir were deleted (DELETE /jobs/{id} or the
    # retention sweep). The row stays, so GET /jobs/{id} still answers and downloads are 410.
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # When the files of a tombstoned job were confirmed removed; NULL with deleted_at set means
    # a purge that did not complete (process died), which the reaper finishes.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Artifact(Base):
    """A finished file of a job; the API serves only names that exist as rows."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
