"""Programmatic Alembic: ``d4c db upgrade`` and the tests migrate without an alembic.ini cwd."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.config import Settings
from app.db.session import make_sync_engine

# migrations/ sits next to the app package in the repository (installed editable).
REPO_ROOT = Path(__file__).resolve().parents[2]


class MigrationsNotFound(RuntimeError):
    """The migration scripts are not next to the installed code (a non-editable install)."""


def alembic_config() -> Config:
    if not (REPO_ROOT / "migrations" / "env.py").is_file():
        raise MigrationsNotFound(
            f"the Alembic migrations are not at {REPO_ROOT / 'migrations'}: run d4c from a "
            "checkout installed with `pip install -e .` (as the Docker images do)"
        )
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    return cfg


def _run(settings: Settings, fn: str, rev: str) -> None:
    cfg = alembic_config()  # before the engine: a missing script dir touches no database
    engine = make_sync_engine(settings)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            getattr(command, fn)(cfg, rev)
    finally:
        engine.dispose()


def upgrade(settings: Settings, rev: str = "head") -> None:
    _run(settings, "upgrade", rev)


def downgrade(settings: Settings, rev: str = "-1") -> None:
    _run(settings, "downgrade", rev)
