"""PostgreSQL for tests: a throwaway database on the shared server, or a private cluster a test
may stop and start (the shared server is never stopped)."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

from tests.support.procs import Unavailable, skip
from worker.client import free_port


def pg_admin_url(url: str, unavailable: Unavailable = skip) -> str:
    """``url`` or the same with role ``root``: the one trust auth lets in (machines differ)."""
    for candidate in (url, url.replace("postgres@", "root@", 1)):
        try:
            with psycopg.connect(candidate, connect_timeout=3):
                return candidate
        except psycopg.OperationalError:
            continue
    unavailable(f"PostgreSQL is not reachable at {url} (as postgres or root)")


@contextlib.contextmanager
def pg_database(admin_url: str, prefix: str = "d4c_test") -> Iterator[str]:
    """Create ``<prefix>_<random>``; yield its SQLAlchemy URL (psycopg); drop it afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(admin_url).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PgCluster:
    """A private PostgreSQL cluster (``initdb`` into a temporary directory, its own port,
    trust auth): a test may stop and start it without touching the shared server.

    PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``.
    """

    def __init__(self) -> None:
        found = shutil.which("pg_ctl") or next(
            iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None
        )
        if found is None:
            skip("PostgreSQL server binaries (pg_ctl) are not installed")
        self.bindir = Path(found).parent
        self.port = free_port()
        self.runas: list[str] = []
        # Not under pytest's 0700 tmp: the postgres user must reach it.
        self.dir = Path(tempfile.mkdtemp(prefix="d4c-pg-"))
        self.log_path = self.dir / "postgres.log"
        if os.geteuid() == 0:
            self.runas = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [*self.runas, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed: {done.stdout}\n{done.stderr}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        data = str(self.dir / "data")
        self._run("pg_ctl", "-D", data, "-o", opts, "-l", str(self.log_path), "-w", "start")

    def stop(self) -> None:
        """Fast shutdown: open connections are cut, as when a database server goes down."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
