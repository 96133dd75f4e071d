"""Programmatic Alembic: ``d4c db upgrade``, ``serve``, ``keys create`` and the tests migrate
without an alembic.ini or a repository checkout.

The migration scripts ship inside the ``app.db`` package (``app/db/migrations``, package data)
and are found through ``importlib.resources``, so a wheel installed into any environment finds
them the same way the editable development install does.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from alembic import command
from alembic.config import Config

from app.core.config import Settings
from app.db.session import make_sync_engine


class MigrationsNotFound(RuntimeError):
    """The installed ``app.db`` package has no usable migration scripts (a broken build that
    left the package data out, or an import from a zip archive Alembic cannot read)."""


def migrations_dir() -> Path:
    """The ``app/db/migrations`` directory of the installed package.

    Alembic loads env.py and the revisions by file path, so the resource must be a real
    directory; wheels install unzipped, so it is one unless the package data was left out.
    """
    resource = files("app.db") / "migrations"
    path = Path(str(resource))
    if not isinstance(resource, Path) or not (path / "env.py").is_file():
        raise MigrationsNotFound(
            f"the Alembic migrations are not at {path}: the installed d4c-service package "
            "lacks its app/db/migrations package data; reinstall it from a complete wheel"
        )
    return path


def alembic_config() -> Config:
    """An Alembic config for the packaged scripts; the URL comes from the settings (env.py)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
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
