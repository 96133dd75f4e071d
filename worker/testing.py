"""Helpers for tests and benchmarks that run real workers: a throwaway PostgreSQL database, a
private Redis database, a ``d4c worker`` subprocess, job rows with test-sized recipes.

Shared machines run other people's Redis data: a test takes a numbered database that is
empty, marks it with a lock key (``SET NX``) so a parallel session cannot take the same one,
and afterwards deletes only that database's keys. Nothing here stops or flushes a server.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from app.db.models import Job, Tenant
from app.db.session import sync_sessionmaker
from worker.client import free_port

REDIS_HOST = os.environ.get("D4C_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("D4C_TEST_REDIS_PORT", "6379"))
# How a missing shared service surfaces: a skip in tests, an error in benchmarks.
Unavailable = Callable[[str], NoReturn]

# The engine's budgets at test size: seconds on 2 shared cores instead of minutes. Jobs sent
# over HTTP pass the same values as the body's ``quant`` object (``TINY_QUANT_HTTP``).
TINY_QUANT: dict[str, Any] = {
    "recon_iters": 2,
    "range_init_images": 8,
    "range_init_prompts": 8,
    "mse_candidates": 10,
    "mse_max_samples": 16,
}
TINY_QUANT_HTTP: dict[str, Any] = {k: v for k, v in TINY_QUANT.items() if k != "recon_iters"}
TINY_CALIBRATION: dict[str, Any] = {"method": "noise", "num_images": 8, "num_prompts": 8}


def tiny_recipe(**quant: Any) -> dict[str, Any]:
    """A test-sized ``Recipe.to_dict()`` (``quant`` overrides, e.g. ``recon_iters=200``)."""
    from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe

    return Recipe(
        quant=QuantRecipe(**(TINY_QUANT | quant)),
        calibration=CalibrationRecipe(**TINY_CALIBRATION),
    ).to_dict()


def _skip(reason: str) -> NoReturn:
    import pytest

    pytest.skip(reason)


def pg_admin_url(url: str, unavailable: Unavailable = _skip) -> str:
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


@contextlib.contextmanager
def redis_database(
    lock_key: str = "d4c:test:lock",
    unavailable: Unavailable = _skip,
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


def service_env(
    data_dir: Path,
    database_url: str | None,
    broker_url: str | None,
    **extra: str,
) -> dict[str, str]:
    """Environment for a service subprocess: fast heartbeats and reaping, quiet threads."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("D4C_") or k.startswith("D4C_TEST")
    }
    env |= {
        "HF_HUB_OFFLINE": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "D4C_DATA_DIR": str(data_dir),
        "D4C_HEARTBEAT_S": "0.5",
        "D4C_STALE_AFTER_S": "4",
        "D4C_WORKER_REQUEUE_QUEUED_AFTER_S": "3",
        "D4C_WORKER_PROGRESS_INTERVAL_S": "0.2",
        "D4C_WORKER_CANCEL_POLL_S": "0.2",
    }
    if database_url:
        env["D4C_DATABASE_URL"] = database_url
    if broker_url:
        env["D4C_BROKER_URL"] = broker_url
    return env | extra


class Process:
    """A ``d4c ...`` subprocess with its output in a log file (shown when a test fails)."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "d4c_core.cli", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: kill() reaches the pool's children
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def kill(self) -> None:
        """SIGKILL the whole process group (a worker and its pool child)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def insert_job(
    settings: Any,
    recipe: dict[str, Any],
    *,
    arch: str = "d4c-tiny-vit",
    eval_task: str | None = None,
    **values: Any,
) -> str:
    """Insert a queued job row (and its tenant) directly, as ``POST /jobs`` would."""
    with sync_sessionmaker(settings)() as db, db.begin():
        tenant = Tenant(name=f"t-{secrets.token_hex(4)}")
        db.add(tenant)
        db.flush()
        job = Job(
            tenant_id=tenant.id,
            model={"arch": arch, "pretrained": "builtin"},
            recipe=recipe,
            eval_task=eval_task,
            request_hash=secrets.token_hex(32),
            **values,
        )
        db.add(job)
        db.flush()
        return job.id


def job_row(settings: Any, job_id: str) -> Job:
    with sync_sessionmaker(settings)() as db:
        job = db.get(Job, job_id)
        assert job is not None
        return job


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy; return its value; fail with ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class RedisServer:
    """A private ``redis-server`` without persistence on its own port: a test may kill and
    restart it (the shared server on 6379 is never touched)."""

    def __init__(self, log_path: Path) -> None:
        import shutil

        self.binary = shutil.which("redis-server")
        if self.binary is None:
            _skip("redis-server is not installed")
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


class PgCluster:
    """A private PostgreSQL cluster (``initdb`` into a temporary directory, its own port,
    trust auth): a test may stop and start it without touching the shared server.

    PostgreSQL refuses to run as root, so as root the cluster belongs to ``postgres``.
    """

    def __init__(self) -> None:
        import glob
        import shutil
        import tempfile

        found = shutil.which("pg_ctl") or next(
            iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)), None
        )
        if found is None:
            _skip("PostgreSQL server binaries (pg_ctl) are not installed")
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
        import shutil

        with contextlib.suppress(RuntimeError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


JOB_TIMEOUT_S = 240
FINISHED = ("succeeded", "failed", "cancelled")
ARTIFACTS = ["calibration.png", "manifest.json", "model.safetensors", "report.json"]


def job_body(recon_iters: int, seed: int = 0) -> dict[str, Any]:
    """A ``POST /jobs`` body for a test-sized d4c-tiny-vit W4A8 job on noise."""
    return {
        "model": {"arch": "d4c-tiny-vit", "pretrained": "builtin"},
        "bits": "w4a8",
        "calibration": {
            "method": "noise",
            "num_images": 8,
            "num_prompts": 8,
            "recon_iters": recon_iters,
        },
        "quant": TINY_QUANT_HTTP,
        "seed": seed,
    }


class ServiceStack:
    """One deployment on this machine, as fault and load tests need it: a ``d4c serve`` API
    process (PostgreSQL + Redis, so no embedded worker), ``d4c worker`` processes, and an
    authenticated HTTP client talking to the API over loopback."""

    def __init__(self, root: Path, database_url: str, broker_url: str, **env: str) -> None:
        from app.cli import create_key
        from app.core.config import Settings

        self.root = root
        self.data_dir = root / "data"
        self.env = service_env(self.data_dir, database_url, broker_url, **env)
        self.settings = Settings(
            data_dir=self.data_dir, database_url=database_url, broker_url=broker_url
        )
        self.port = free_port()
        self.api: Process | None = None
        self.workers: list[Process] = []
        key = create_key(f"stack-{os.getpid()}", self.settings)
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{self.port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )

    def start_api(self) -> Process:
        n = len(list(self.root.glob("api*.log")))
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.api = Process(args, self.env, self.root / f"api{n}.log")
        wait_for(self._healthy, 90, "the API to answer /healthz")
        return self.api

    def _healthy(self) -> bool:
        assert self.api is not None
        if self.api.proc.poll() is not None:
            raise AssertionError(f"API exited:\n{self.api.log_tail()}")
        try:
            return self.http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self) -> Process:
        worker = Process(["worker"], self.env, self.root / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        return worker

    def worker_id(self, worker: Process) -> str:
        from worker.tasks import default_worker_id

        return default_worker_id(worker.pid)

    def submit(self, recon_iters: int) -> str:
        r = self.http.post("/jobs", json=job_body(recon_iters))
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = JOB_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Poll the job until ``until(job)``; a job finished otherwise fails the test."""

        def check() -> dict[str, Any] | None:
            job = self.job(job_id)
            if until(job):
                return job
            if job["state"] in FINISHED:
                raise AssertionError(f"job ended {job['state']} waiting for {what}: {job}")
            return None

        return dict(wait_for(check, timeout, what, every=0.2))

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.wait(job_id, lambda j: j["state"] in FINISHED, f"job {job_id} to finish")

    def units_done(self, job_id: str) -> int:
        units = self.settings.work_dir / job_id / "units"
        return len(list(units.glob("*.safetensors"))) if units.is_dir() else 0

    def download_and_verify(self, job_id: str, dest: Path) -> dict[str, Any]:
        from d4c_core.artifacts import verify

        r = self.http.get(f"/jobs/{job_id}/artifacts")
        assert r.status_code == 200, r.text
        listing = r.json()
        assert sorted(a["name"] for a in listing) == ARTIFACTS
        dest.mkdir(parents=True)
        for entry in listing:
            r = self.http.get(f"/jobs/{job_id}/artifacts/{entry['name']}")
            assert r.status_code == 200 and r.headers["etag"].strip('"') == entry["sha256"]
            (dest / entry["name"]).write_bytes(r.content)
        return dict(verify(dest))

    def published(self) -> list[str]:
        """Job directories in the artifact root (staging excluded)."""
        root = self.settings.artifacts_dir
        return sorted(p.name for p in root.iterdir() if p.name != ".staging")

    def staging_leftovers(self) -> list[str]:
        staging = self.settings.artifacts_dir / ".staging"
        return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []

    def finished_runs(self, job_id: str) -> list[str]:
        """The ``outcome`` of every ``finished`` record the workers logged for ``job_id``."""
        outcomes = []
        for worker in self.workers:
            for line in worker.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rec = json.loads(line)
                    if rec.get("message") == "finished" and rec.get("job_id") == job_id:
                        outcomes.append(rec.get("outcome"))
        return outcomes

    def close(self, failed: bool) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            if failed:
                print(f"--- {proc.log_path.name}\n{proc.log_tail()}")
            proc.stop()
        self.http.close()
