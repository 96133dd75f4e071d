"""Container healthchecks, run by Docker inside the image (no curl in slim images).

``healthcheck.py http URL`` — exit 0 when URL answers 2xx (the API's ``/healthz``/``/readyz``).
``healthcheck.py worker`` — exit 0 when the worker's broker and job database answer: a Celery
worker here has remote control off (so ``celery inspect ping`` cannot work), and a worker
whose broker or DB is gone cannot take or finish jobs, which is what "unhealthy" should mean.
The worker process itself is PID 1: if it dies the container stops, no probe needed.
"""

from __future__ import annotations

import sys
import urllib.request

TIMEOUT_S = 4.0


def check_http(url: str) -> int:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # raises on 4xx/5xx
        return 0 if 200 <= resp.status < 300 else 1


def check_worker() -> int:
    from sqlalchemy import text

    from app.core.config import get_settings
    from app.db.session import make_sync_engine
    from app.queue import ping

    if not ping(TIMEOUT_S):
        print("broker unreachable", file=sys.stderr)
        return 1
    engine = make_sync_engine(get_settings())
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    return 0


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["http"] and len(argv) == 2:
            return check_http(argv[1])
        if argv == ["worker"]:
            return check_worker()
    except Exception as e:  # any failure is "unhealthy", with a one-line reason
        print(f"unhealthy: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print("usage: healthcheck.py http URL | worker", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
