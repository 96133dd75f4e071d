"""The per-tenant upload quota: bytes of checkpoints one tenant keeps stored at once.

``max_upload_bytes`` caps one upload; without a sum over the tenant's checkpoints, a tenant
could still fill the shared disk one capped upload at a time. The sum is checked three times,
each time as early as the information allows: against a declared ``Content-Length`` before
any byte is read, against the running size while streaming, and finally under the tenant lock
right before the row is committed, so two concurrent uploads cannot both squeeze into the
same remaining room. ``DELETE /models/{id}`` frees what the checkpoint took.
"""

from __future__ import annotations

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app import crud
from app.api.deps import read_connection
from app.api.problems import Problem
from app.core.config import Settings
from app.db.models import Checkpoint


async def stored_bytes(db: AsyncConnection | AsyncSession, tenant_id: str) -> int:
    """Bytes of the tenant's uploaded checkpoints."""
    total = await db.scalar(
        select(func.coalesce(func.sum(Checkpoint.size_bytes), 0)).where(
            Checkpoint.tenant_id == tenant_id
        )
    )
    return int(total or 0)


def exceeded(settings: Settings, used: int, size: int | None, *, at_least: bool = False) -> Problem:
    """413 naming the quota, what is stored and how to make room (``at_least``: ``size`` is
    what arrived before the stream was cut, not the declared length)."""
    quota = settings.max_upload_bytes_per_tenant
    needs = "no room is left"
    if size is not None:
        needs = f"this upload needs {'at least ' if at_least else ''}{size} bytes"
    return Problem(
        413,
        "Upload quota exceeded",
        f"the tenant's checkpoints take {used} of its {quota} bytes and {needs}; delete "
        "checkpoints it no longer needs (DELETE /models/{id}) to make room",
        type_="upload-quota-exceeded",
    )


def check(settings: Settings, used: int, size: int | None) -> None:
    """Refuse ``size`` more bytes (None: an undeclared size, refused only when full)."""
    quota = settings.max_upload_bytes_per_tenant
    if used + (size or 0) > quota or (size is None and used >= quota):
        raise exceeded(settings, used, size)


async def used_before_upload(
    request: Request, tenant_id: str, settings: Settings, declared: str | None
) -> int:
    """Bytes the tenant stores now; refuses a declared ``Content-Length`` that cannot fit.
    Read on an autocommit connection: no transaction is held open while the body streams."""
    async with read_connection(request) as conn:
        used = await stored_bytes(conn, tenant_id)
    check(settings, used, int(declared) if declared and declared.isdigit() else None)
    return used


def check_streamed(settings: Settings, used: int, size: int) -> None:
    """Cut a body without a declared length as soon as it passes the quota."""
    if used + size > settings.max_upload_bytes_per_tenant:
        raise exceeded(settings, used, size, at_least=True)


async def reserve(session: AsyncSession, tenant_id: str, settings: Settings, size: int) -> None:
    """Take the tenant lock and re-check with ``size`` bytes received; the caller commits its
    row in the same transaction, which ends the lock."""
    await crud.lock_tenant(session, tenant_id)
    check(settings, await stored_bytes(session, tenant_id), size)
