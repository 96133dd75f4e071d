"""Redis for tests: a reserved database on the shared server, or a private server a test may
kill and restart.

Shared machines run other people's Redis data: a test takes a numbered database that is
empty, marks it with a lock key (``SET NX``) so a parallel session cannot take the same one,
and afterwards deletes only that database's keys. Nothing here stops or flushes a shared
server. (Not named ``redis.py``: that would shadow the client library for code that puts this
directory on ``sys.path``.)
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from tests.support.procs import Unavailable, skip, wait_for
from worker.client import free_port

REDIS_HOST = os.environ.get("D4C_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("D4C_TEST_REDIS_PORT", "6379"))


@contextlib.contextmanager
def redis_database(
    lock_key: str = "d4c:test:lock",
    unavailable: Unavailable = skip,
    host: str = REDIS_HOST,
    port: int = REDIS_PORT,
) -> Iterator[str]:
    """Reserve an empty Redis database 1..15; yield its URL; delete its keys afterwards."""
    numbers = list(range(1, 16))
    random.shuffle(numbers)
    token = secrets.token_hex(8)
    for n in numbers:
        client = redis.Redis(host=host, port=port, db=n, socket_timeout=5)
        try:
            if client.dbsize() != 0 or not client.set(lock_key, token, nx=True, ex=3600):
                continue
        except redis.ConnectionError as e:
            unavailable(f"Redis is not reachable at {host}:{port}: {e}")
        try:
            yield f"redis://{host}:{port}/{n}"
        finally:
            if client.get(lock_key) == token.encode():
                for key in client.scan_iter(count=500):
                    if key != lock_key.encode():
                        client.delete(key)
                client.delete(lock_key)
        return
    unavailable(f"no free Redis database at {host}:{port}")


class RedisServer:
    """A private ``redis-server`` without persistence on its own port: a test may kill and
    restart it (the shared server on 6379 is never touched)."""

    def __init__(self, log_path: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            skip("redis-server is not installed")
        self.port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1)
        wait_for(_pings(client), 20, f"redis-server on port {self.port}", every=0.05)

    def kill(self) -> None:
        """SIGKILL: everything it held (queued messages, unacked deliveries) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _pings(client: redis.Redis) -> Callable[[], bool]:
    def ping() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    return ping
