"""Alembic: upgrade from empty, schema == models, downgrade cleanly (PostgreSQL and SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.core.config import Settings
from app.db.base import Base
from app.db.migrate import downgrade, upgrade
from app.db.session import make_sync_engine
from worker.testing import pg_database

TABLES = {"tenants", "api_keys", "checkpoints", "jobs", "artifacts"}


def _roundtrip(settings: Settings) -> None:
    engine = make_sync_engine(settings)
    try:
        upgrade(settings)
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []  # migrations match the models
            fks = {fk["name"] for fk in inspect(conn).get_foreign_keys("jobs")}
            assert "fk_jobs_tenant_id_tenants" in fks  # the naming convention is applied
        downgrade(settings, "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) <= {"alembic_version"}
        upgrade(settings)  # and up again from the downgraded state
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_migrations_sqlite(tmp_path: Path) -> None:
    _roundtrip(Settings(data_dir=tmp_path))


def test_migrations_postgresql(pg_admin: str) -> None:
    with pg_database(pg_admin) as url:
        _roundtrip(Settings(database_url=url))


def test_sqlite_pragmas(tmp_path: Path) -> None:
    engine = make_sync_engine(Settings(data_dir=tmp_path))
    with engine.connect() as conn:
        row: Any = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
        assert str(row).lower() == "wal"
        assert int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    engine.dispose()
