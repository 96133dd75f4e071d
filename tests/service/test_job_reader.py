"""The hot-path job reader: asyncpg and SQLAlchemy give the same row; one pool, however many
first requests race for it."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from app.core.config import Settings
from app.db.job_reader import AsyncpgJobReader, SqlAlchemyJobReader
from app.db.session import async_engine, autocommit_engine
from tests.support.jobs import insert_job, job_row, tiny_recipe

pytestmark = pytest.mark.anyio


async def test_asyncpg_reader_matches_sqlalchemy_and_makes_one_pool(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(database_url=pg_url)
    job_id = insert_job(settings, tiny_recipe())
    tenant_id = job_row(settings, job_id).tenant_id
    created: list[Any] = []
    real_create_pool = asyncpg.create_pool

    async def counting_create_pool(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)  # widen the window a racing first request would hit
        pool = await real_create_pool(*args, **kwargs)
        created.append(pool)
        return pool

    monkeypatch.setattr(asyncpg, "create_pool", counting_create_pool)
    engine = async_engine(settings)
    fast = AsyncpgJobReader(engine)
    slow = SqlAlchemyJobReader(autocommit_engine(engine))
    try:
        rows = await asyncio.gather(*(fast(tenant_id, job_id) for _ in range(10)))
        assert len(created) == 1
        want = await slow(tenant_id, job_id)
        assert want is not None and all(dict(r or {}) == dict(want) for r in rows)
        assert await fast("another-tenant", job_id) is None  # tenancy is in the statement
    finally:
        await fast.close()
        await engine.dispose()
