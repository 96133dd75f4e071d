"""Programmatic Alembic: ``d4c db upgrade`` and the tests migrate without an alembic.ini cwd."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.config import Settings
from app.db.session import make_sync_engine

# migrations/ sits next to the app package in the repository (installed editable).
REPO_ROOT = Path(__file__).resolve().parents[2]


def alembic_config() -> Config:
    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    return cfg


def _run(settings: Settings, fn: str, rev: str) -> None:
    engine = make_sync_engine(settings)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, fn)(cfg, rev)
    finally:
        engine.dispose()


def upgrade(settings: Settings, rev: str = "head") -> None:
    _run(settings, "upgrade", rev)


def downgrade(settings: Settings, rev: str = "-1") -> None:
    _run(settings, "downgrade", rev)
