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
from tests.support.pg import pg_database

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
    """An installed package without its migration scripts (a build that dropped the package
    data): say so, exit 2, no traceback, nothing created."""
    from app.db import migrate
    from d4c_core.cli import main

    monkeypatch.setattr(migrate, "files", lambda _pkg: tmp_path / "site-packages" / "app" / "db")
    monkeypatch.setenv("D4C_DATA_DIR", str(tmp_path / "data"))
    assert main(["db", "upgrade"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the Alembic migrations are not at") and "package data" in err
    assert not (tmp_path / "data" / "d4c.db").exists()


def test_migrations_ship_inside_the_package() -> None:
    """The scripts are found through the installed ``app.db`` package, not the checkout."""
    from app.db import migrate

    found = migrate.migrations_dir()
    assert found == Path(migrate.__file__).resolve().parent / "migrations"
    assert {p.name for p in (found / "versions").glob("0*.py")} >= {"0001_initial_schema.py"}


def _deletion_columns_keep_rows(settings: Settings) -> None:
    """0002 adds the tombstone columns to a populated database and drops them again without
    losing a row (on SQLite a table rebuild would cascade-delete the artifacts)."""
    from sqlalchemy import text

    engine = make_sync_engine(settings)
    try:
        upgrade(settings, "0001")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO tenants VALUES ('t', 'tenant', CURRENT_TIMESTAMP)"))
            conn.execute(
                text(
                    "INSERT INTO jobs (id, tenant_id, state, progress, model, recipe, "
                    "request_hash, cancel_requested, attempts, created_at) VALUES ('j', 't', "
                    "'succeeded', 1.0, '{}', '{}', 'h', false, 1, CURRENT_TIMESTAMP)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO artifacts VALUES ('a', 'j', 'report.json', 2, 's', "
                    "CURRENT_TIMESTAMP)"
                )
            )
        upgrade(settings)
        with engine.connect() as conn:
            row = conn.execute(text("SELECT state, deleted_at, purged_at FROM jobs")).one()
            assert tuple(row) == ("succeeded", None, None)
        downgrade(settings, "0001")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM artifacts")).scalar() == 1
            columns = {c["name"] for c in inspect(conn).get_columns("jobs")}
            assert "deleted_at" not in columns
    finally:
        engine.dispose()


def test_deletion_migration_keeps_rows_sqlite(tmp_path: Path) -> None:
    _deletion_columns_keep_rows(Settings(data_dir=tmp_path))


def test_deletion_migration_keeps_rows_postgresql(pg_admin: str) -> None:
    with pg_database(pg_admin) as url:
        _deletion_columns_keep_rows(Settings(database_url=url))
