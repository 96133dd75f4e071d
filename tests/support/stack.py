"""One deployment on this machine, as fault and load tests need it: a ``d4c serve`` API
process, ``d4c worker`` processes, and an authenticated HTTP client over loopback."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.support.jobs import ARTIFACTS, FINISHED, JOB_TIMEOUT_S, job_body
from tests.support.procs import Process, service_env, wait_for
from worker.client import free_port


class ServiceStack:
    """One deployment on this machine, as fault and load tests need it: a ``d4c serve`` API
    process (PostgreSQL + Redis, so no in-process worker; or, with neither URL, the embedded
    default with its in-process worker), ``d4c worker`` processes, and an authenticated HTTP
    client talking to the API over loopback."""

    def __init__(
        self, root: Path, database_url: str | None, broker_url: str | None, **env: str
    ) -> None:
        from app.cli import create_key
        from app.core.config import Settings
        from app.db.migrate import upgrade

        self.root = root
        self.data_dir = root / "data"
        self.env = service_env(self.data_dir, database_url, broker_url, **env)
        self.settings = Settings(
            data_dir=self.data_dir, database_url=database_url, broker_url=broker_url
        )
        if database_url is None:  # embedded SQLite: `d4c serve` would migrate it too late
            upgrade(self.settings)
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
