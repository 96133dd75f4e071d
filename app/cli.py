"""Subcommands this package adds to ``d4c`` (entry-point group ``d4c.cli``): serve, db, keys."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.core.config import Settings


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve``, ``db upgrade|downgrade`` and ``keys create`` to the ``d4c`` parser."""
    p = sub.add_parser("serve", help="run the HTTP API (plus a worker on the embedded default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_serve)

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
    kc = ksub.add_parser("create", help="create an API key (printed once, as the last line)")
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
    if settings.embedded:
        from app.db.migrate import upgrade

        upgrade(settings)
    key = create_key(args.tenant)
    print(f"API key for tenant {args.tenant!r} (shown once; only its hash is stored):")
    print(key)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.main import create_app

    settings = get_settings()
    configure_logging(settings.log_level)
    stop = None
    if settings.embedded:
        # Embedded default: migrate the SQLite file and run a worker in this process.
        from app.db.migrate import upgrade

        upgrade(settings)
        from worker.embedded import start_worker_thread

        stop = start_worker_thread(settings)
    try:
        uvicorn.run(
            create_app(settings),
            host=args.host,
            port=args.port,
            log_config=None,
            access_log=False,
        )
    finally:
        if stop is not None:
            _stop(stop)
    return 0


def _stop(handle: Any) -> None:
    """Stop the embedded worker, whatever handle ``start_worker_thread`` returned."""
    for attr in ("stop", "shutdown", "close"):
        fn = getattr(handle, attr, None)
        if callable(fn):
            fn()
            return
    if callable(handle):
        handle()
        return
    print("warning: could not stop the embedded worker cleanly", file=sys.stderr)
