"""Alembic: upgrade from empty, schema == models, downgrade cleanly (PostgreSQL and SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
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


def test_db_upgrade_without_migrations_is_a_clear_cli_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A non-editable install has no migrations/ beside the code: say so, exit 2, no
    traceback, nothing created."""
    from app.db import migrate
    from d4c_core.cli import main

    monkeypatch.setattr(migrate, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setenv("D4C_DATA_DIR", str(tmp_path / "data"))
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Alembic migrations are not at") and "pip install -e" in err
    assert not (tmp_path / "data" / "d4c.db").exists()
