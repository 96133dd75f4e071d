"""Database operations of the API, each scoped to a tenant.

Every lookup takes the tenant id and filters on it in SQL, so another tenant's row is
indistinguishable from a missing one (both come back as None -> 404).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.db.models import (
    ACTIVE_STATES,
    FINISHED_STATES,
    ApiKey,
    Artifact,
    Checkpoint,
    Job,
    Tenant,
    utcnow,
)
from app.db.session import SQLITE_BEGIN
from app.jobspec import ValidatedJob
from app.schemas import JobOut

# Hot-path statements, built once at import: SQLAlchemy memoizes a statement object's cache
# key, so re-running the same object skips building the expression and keying the compiled
# cache each request. They run on an autocommit connection (``app.state.read_engine``).
_TENANT_OF_KEY = select(ApiKey.tenant_id).where(
    ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None)
)
# Exactly the columns ``JobOut`` shows: no ORM object, identity map or unshown JSON to decode.
JOB_OUT_BY_ID = select(*(getattr(Job, name) for name in JobOut.model_fields)).where(
    Job.id == bindparam("job_id"), Job.tenant_id == bindparam("tenant_id")
)


async def tenant_of_key(conn: AsyncConnection, key_hash: str) -> str | None:
    """The tenant owning the unrevoked key with this hash, else None."""
    return (await conn.execute(_TENANT_OF_KEY, {"key_hash": key_hash})).scalar()


async def read_job(conn: AsyncConnection, tenant_id: str, job_id: str) -> Row[Any] | None:
    """``GET /jobs/{id}``'s one query: the ``JobOut`` columns of the tenant's job, else None."""
    result = await conn.execute(JOB_OUT_BY_ID, {"job_id": job_id, "tenant_id": tenant_id})
    return result.first()


async def get_job(session: AsyncSession, tenant_id: str, job_id: str) -> Job | None:
    return await session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


async def get_job_by_idempotency_key(session: AsyncSession, tenant_id: str, key: str) -> Job | None:
    return await session.scalar(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    )


async def count_active_jobs(session: AsyncSession, tenant_id: str) -> int:
    n = await session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.state.in_(ACTIVE_STATES))
    )
    return int(n or 0)


async def lock_tenant(session: AsyncSession, tenant_id: str) -> None:
    """Begin a transaction that serializes the tenant's submissions until it ends.

    PostgreSQL: a row lock on the tenant. SQLite has no row locks and pysqlite sends no BEGIN
    before a SELECT, so a count-then-insert would race; there the transaction begins with
    ``BEGIN IMMEDIATE`` (the database's write lock, held from the count to the commit; other
    writers wait up to the busy timeout). Must open the session's transaction: any earlier
    one is ended first (callers only read before this).
    """
    if session.in_transaction():
        await session.rollback()
    if session.bind.dialect.name == "sqlite":
        await session.connection(execution_options={SQLITE_BEGIN: "IMMEDIATE"})
    else:
        await session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


async def insert_job(
    session: AsyncSession,
    tenant_id: str,
    spec: ValidatedJob,
    request_hash: str,
    idempotency_key: str | None,
) -> Job | None:
    """Insert a queued job and commit; None when the idempotency key was taken concurrently."""
    job = Job(
        tenant_id=tenant_id,
        state="queued",
        progress=0.0,
        model=spec.model,
        recipe=spec.recipe,
        eval_task=spec.eval_task,
        request_hash=request_hash,
        idempotency_key=idempotency_key,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
    )
    session.add(job)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        return None
    return job


def encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of the last job of the previous page; ValueError if malformed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, job_id = json.loads(raw)
        created = datetime.fromisoformat(ts)
    except (binascii.Error, ValueError, TypeError) as e:
        raise ValueError("malformed cursor") from e
    if not isinstance(job_id, str) or created.tzinfo is None:
        raise ValueError("malformed cursor")
    return created, job_id


async def list_jobs(
    session: AsyncSession,
    tenant_id: str,
    limit: int,
    state: str | None = None,
    after: tuple[datetime, str] | None = None,
) -> tuple[Sequence[Job], str | None]:
    """A page of the tenant's jobs, newest first (keyset on created_at, id)."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if state is not None:
        q = q.where(Job.state == state)
    if after is not None:
        created, job_id = after
        q = q.where((Job.created_at < created) | ((Job.created_at == created) & (Job.id < job_id)))
    q = q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    rows = (await session.scalars(q)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(rows[-1]) if more and rows else None


async def request_cancel(session: AsyncSession, job: Job) -> Job:
    """Cancel: a queued job ends now; a running one is flagged for the worker to stop.

    Conditional UPDATEs, so a worker moving the job to running at the same moment cannot be
    overwritten: whichever state the row is in when the UPDATE lands decides.
    """
    now = utcnow()
    res = await session.execute(
        update(Job)
        .where(Job.id == job.id, Job.state == "queued")
        .values(state="cancelled", cancel_requested=True, finished_at=now)
    )
    if res.rowcount == 0:  # type: ignore[attr-defined]
        await session.execute(
            update(Job)
            .where(Job.id == job.id, Job.state.not_in(FINISHED_STATES))
            .values(cancel_requested=True)
        )
    await session.commit()
    await session.refresh(job)
    return job


async def list_artifacts(session: AsyncSession, job_id: str) -> Sequence[Artifact]:
    return (
        await session.scalars(
            select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)
        )
    ).all()


async def get_artifact(session: AsyncSession, job_id: str, name: str) -> Artifact | None:
    return await session.scalar(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)
    )


async def get_checkpoint(
    session: AsyncSession, tenant_id: str, checkpoint_id: str
) -> Checkpoint | None:
    return await session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.tenant_id == tenant_id)
    )
