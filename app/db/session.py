"""Engines and session factories for the two sides of the service.

The API is async (asyncpg / aiosqlite); the worker is sync (psycopg / pysqlite). Both take the
same ``Settings.db_url`` and map its driver, so one ``D4C_DATABASE_URL`` configures both.
SQLite runs in WAL mode with a busy timeout so the API and an in-process worker can share a file.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def sync_url(settings: Settings) -> URL:
    """The configured URL with a sync driver: psycopg (3) for PostgreSQL, pysqlite for SQLite."""
    url = make_url(settings.db_url)
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+psycopg")
    if _is_sqlite(url):
        return url.set(drivername="sqlite")
    return url


def async_url(settings: Settings) -> URL:
    """The configured URL with an async driver: asyncpg for PostgreSQL, aiosqlite for SQLite."""
    url = make_url(settings.db_url)
    if url.get_backend_name() == "postgresql":
        return url.set(drivername="postgresql+asyncpg")
    if _is_sqlite(url):
        return url.set(drivername="sqlite+aiosqlite")
    return url


def _prepare_sqlite(url: URL) -> None:
    """Create the SQLite file's directory (the embedded default lives under ``data_dir``)."""
    if url.database and url.database != ":memory:":
        from pathlib import Path

        Path(url.database).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


# Execution option naming how SQLite begins a transaction ("IMMEDIATE" takes the write lock
# at BEGIN). pysqlite emits no BEGIN before a SELECT, so a read-then-write transaction (count
# the tenant's active jobs, then insert) is not serialized unless it begins this way.
SQLITE_BEGIN = "d4c_sqlite_begin"


def _sqlite_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN)
    if mode is not None:
        conn.exec_driver_sql(f"BEGIN {mode}")


def _listen_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)


def make_sync_engine(settings: Settings, **kwargs: Any) -> Engine:
    """A new sync engine (the worker, the CLI, migrations)."""
    return _make_sync_engine(sync_url(settings), **kwargs)


def _make_sync_engine(url: URL, **kwargs: Any) -> Engine:
    if _is_sqlite(url):
        _prepare_sqlite(url)
        engine = create_engine(url, **kwargs)
        _listen_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


@lru_cache(maxsize=8)
def _cached_sync_engine(url: str) -> Engine:
    return _make_sync_engine(make_url(url))


def sync_engine(settings: Settings) -> Engine:
    """The process-wide sync engine for ``settings``' database (cached per URL)."""
    return _cached_sync_engine(sync_url(settings).render_as_string(hide_password=False))


def sync_sessionmaker(settings: Settings) -> sessionmaker[Session]:
    """``SessionLocal``-style factory: ``with sync_sessionmaker(s)() as db, db.begin(): ...``."""
    return sessionmaker(sync_engine(settings), expire_on_commit=False)


def async_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    """A new async engine for the API; the app creates one per process in its lifespan."""
    url = async_url(settings)
    if _is_sqlite(url):
        _prepare_sqlite(url)
        engine = create_async_engine(url, **kwargs)
        _listen_sqlite(engine.sync_engine)
        return engine
    kwargs.setdefault("pool_size", 20)
    kwargs.setdefault("max_overflow", 20)
    kwargs.setdefault("pool_timeout", 5)
    connect_args = kwargs.pop("connect_args", {})
    connect_args.setdefault("timeout", 5)  # asyncpg connect timeout: fail fast -> 503
    return create_async_engine(url, connect_args=connect_args, **kwargs)


def async_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """``engine`` (same pool) in AUTOCOMMIT mode, for requests that run one SELECT.

    A transaction around a single read buys nothing, and with asyncpg it costs two extra round
    trips (``BEGIN`` before the query, ``ROLLBACK`` when the connection goes back to the pool):
    on the authenticated hot path (``GET /jobs/{id}``) that is most of the request's database
    time. Setting the mode on checkout is an attribute change on the asyncpg adapter (no round
    trip); on aiosqlite it is a hop to the driver's thread, still no SQL.
    """
    return engine.execution_options(isolation_level="AUTOCOMMIT")
