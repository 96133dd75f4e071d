"""``d4c serve``: the one place that composes the API with a worker.

The API (``app.main.create_app``, run by ``app.server.run``) never imports ``worker``; on the
embedded default (``Settings.embedded``: no broker configured) ``d4c serve`` also runs the
worker in its own process (``worker.inprocess``), and that composition needs both packages, so
it lives here, on the worker side of the ``worker -> app -> d4c_core`` arrows. With a broker
configured it is the API alone, and ``d4c worker`` processes run the jobs.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``serve`` to the ``d4c`` parser."""
    p = sub.add_parser("serve", help="run the HTTP API (plus a worker on the embedded default)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from app.core.config import get_settings
    from app.core.logging import configure_logging
    from app.main import create_app
    from app.server import run as run_server

    settings = get_settings()
    configure_logging(settings.log_level)
    if settings.sqlite:  # a local file nobody else migrates (only a server DB needs `d4c db`)
        from app.db.migrate import upgrade

        upgrade(settings)
    worker = None
    if settings.embedded:
        from worker.inprocess import start_worker_thread

        worker = start_worker_thread(settings)
    try:
        run_server(create_app(settings), args.host, args.port, settings)
    finally:
        if worker is not None:
            worker.stop()
    return 0
