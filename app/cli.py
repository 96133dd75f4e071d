"""Subcommands this package adds to ``d4c`` (entry-point group ``d4c.cli``): db, keys.

``d4c serve`` is registered by ``worker.cli`` (``worker.serve``): on the embedded default it
runs a worker in the API process, and ``app`` never imports ``worker``.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.core.config import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``db upgrade|downgrade`` and ``keys create`` to the ``d4c`` parser."""
    db = sub.add_parser("db", help="job database migrations")
    dbsub = db.add_subparsers(dest="db_command", required=True)
    up = dbsub.add_parser("upgrade", help="migrate to the newest schema")
    up.add_argument("rev", nargs="?", default="head")
    up.set_defaults(func=_db_upgrade)
    down = dbsub.add_parser("downgrade", help="migrate back (default: one revision)")
    down.add_argument("rev", nargs="?", default="-1")
    down.set_defaults(func=_db_downgrade)

    keys = sub.add_parser("keys", help="API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser(
        "create",
        help="create an API key (printed once, as the last line)",
        description="Store a new key's hash in the job database: ./d4c-data/d4c.db by default "
        "(D4C_DATA_DIR), or D4C_DATABASE_URL. `d4c serve` must run with the same settings "
        "(the same working directory on the default) to accept it.",
    )
    kc.add_argument("--tenant", required=True, help="tenant name (created if missing)")
    kc.set_defaults(func=_keys_create)


def _db_upgrade(args: argparse.Namespace) -> int:
    return _migrate("upgrade", args.rev)


def _db_downgrade(args: argparse.Namespace) -> int:
    return _migrate("downgrade", args.rev)


def _migrate(direction: str, rev: str) -> int:
    from app.core.config import get_settings
    from app.db import migrate

    try:
        getattr(migrate, direction)(get_settings(), rev)
    except migrate.MigrationsNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def create_key(tenant_name: str, settings: Settings | None = None) -> str:
    """Create (tenant if missing and) a key; return the plaintext key, storing only its hash."""
    from sqlalchemy import select

    from app.core.config import get_settings
    from app.core.security import PREFIX_LEN, generate_key, hash_key
    from app.db.models import ApiKey, Tenant
    from app.db.session import sync_sessionmaker

    key = generate_key()
    with sync_sessionmaker(settings or get_settings())() as db, db.begin():
        tenant = db.scalar(select(Tenant).where(Tenant.name == tenant_name))
        if tenant is None:
            tenant = Tenant(name=tenant_name)
            db.add(tenant)
            db.flush()
        db.add(ApiKey(tenant_id=tenant.id, prefix=key[:PREFIX_LEN], key_hash=hash_key(key)))
    return key


def _keys_create(args: argparse.Namespace) -> int:
    from app.core.config import get_settings

    settings = get_settings()
    if settings.sqlite:  # a local file nobody else migrates (only a server DB needs `d4c db`)
        from app.db.migrate import upgrade

        upgrade(settings)
    key = create_key(args.tenant)
    where = (
        f"the SQLite file {settings.db_url.removeprefix('sqlite:///')} (D4C_DATA_DIR)"
        if settings.sqlite
        else "the database of D4C_DATABASE_URL"
    )
    # The key only works against a server reading the same database: say which one.
    print(f"API key for tenant {args.tenant!r}, stored (hashed) in {where}; a `d4c serve`")
    print("with the same settings accepts it. Shown once:")
    print(key)
    return 0
