"""Faults a deployment meets, injected into real processes: nothing lost, nothing corrupted.

Every test runs the real ``d4c serve`` API and ``d4c worker`` processes against PostgreSQL
and Redis (a private database on the shared servers, or a private server where the fault
stops one), talks to the API over loopback HTTP as a pipeline would, injects one fault and
asserts the outcome. Each also measures how long recovery took; with ``D4C_BENCH_RECORD``
set those figures are appended there as JSON lines (``bench/faults.py`` tabulates them).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import Artifact, Job
from app.db.session import sync_sessionmaker
from tests.support.jobs import ARTIFACTS, FINISHED, JOB_TIMEOUT_S, job_row
from tests.support.pg import PgCluster
from tests.support.procs import wait_for
from tests.support.redisdb import RedisServer
from tests.support.stack import ServiceStack


@pytest.fixture
def stack(
    make_stack: Callable[..., ServiceStack], private_pg_url: str, broker_url: str
) -> ServiceStack:
    """A deployment on a private PostgreSQL database and Redis index (started by the test)."""
    return make_stack(private_pg_url, broker_url)


def test_killed_worker_resumes_from_its_last_unit(
    stack: ServiceStack, record: Callable[..., None], tmp_path: Path
) -> None:
    """Fault 1: kill -9 mid-reconstruction; a new worker resumes at the last finished unit."""
    stack.start_api()
    stack.start_worker()
    job_id = stack.submit(recon_iters=100)
    wait_for(lambda: stack.units_done(job_id) >= 2, JOB_TIMEOUT_S, "two finished units")
    stack.workers[0].kill()
    t_fault = time.monotonic()
    done_before = stack.units_done(job_id)
    assert stack.job(job_id)["state"] == "running"
    stack.start_worker()
    stack.wait(job_id, lambda j: j["attempts"] == 2 and j["state"] == "running", "the resume")
    record(
        "worker kill -9", "fault → job running again on a new worker", time.monotonic() - t_fault
    )
    job = stack.finished(job_id)
    record("worker kill -9", "fault → job succeeded", time.monotonic() - t_fault)
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert job["metrics"]["resumed_units"] >= done_before >= 2  # not from scratch
    manifest = stack.download_and_verify(job_id, tmp_path / "artifact")
    assert manifest["recipe"] == job["recipe"]
    assert stack.finished_runs(job_id) == ["succeeded"]


def test_a_second_worker_takes_over_a_killed_workers_job(
    stack: ServiceStack, record: Callable[..., None], tmp_path: Path
) -> None:
    """Fault 2: two workers, the one running the job is killed; the other finishes it, once."""
    stack.start_api()
    first, second = stack.start_worker(), stack.start_worker()
    job_id = stack.submit(recon_iters=100)
    wait_for(lambda: stack.units_done(job_id) >= 2, JOB_TIMEOUT_S, "two finished units")
    holder_id = job_row(stack.settings, job_id).worker
    by_id = {stack.worker_id(w): w for w in (first, second)}
    assert holder_id in by_id, (holder_id, list(by_id))
    holder = by_id.pop(holder_id)
    (survivor_id,) = by_id
    holder.kill()
    t_fault = time.monotonic()

    def taken_over() -> bool:
        row = job_row(stack.settings, job_id)
        return row.state == "running" and row.worker == survivor_id

    wait_for(taken_over, JOB_TIMEOUT_S, "the surviving worker to claim the job")
    record(
        "one of two workers kill -9",
        "fault → the other worker runs the job",
        time.monotonic() - t_fault,
    )
    job = stack.finished(job_id)
    record("one of two workers kill -9", "fault → job succeeded", time.monotonic() - t_fault)
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 2 and job["metrics"]["resumed_units"] >= 2
    stack.download_and_verify(job_id, tmp_path / "artifact")

    # Exactly one job row, one artifact set, one successful run.
    with sync_sessionmaker(stack.settings)() as db:
        assert db.scalar(select(func.count()).select_from(Job)) == 1
        names = db.scalars(select(Artifact.name).where(Artifact.job_id == job_id)).all()
    assert sorted(names) == ARTIFACTS
    assert stack.published() == [job_id] and stack.staging_leftovers() == []
    assert stack.finished_runs(job_id) == ["succeeded"]


def test_redis_restarted_without_persistence_loses_no_job(
    make_stack: Callable[..., ServiceStack],
    private_pg_url: str,
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    """Fault 3: the broker restarts empty while one job runs and another waits in its queue;
    the waiting job's message is gone, the reaper re-sends it from the DB; both complete."""
    redis_server = RedisServer(tmp_path / "redis.log")
    redis_server.start()
    try:
        stack = make_stack(private_pg_url, redis_server.url)
        stack.start_api()
        stack.start_worker()
        running = stack.submit(recon_iters=25)
        stack.wait(running, lambda j: j["stage"] == "reconstruction", "the first job to run")
        waiting = stack.submit(recon_iters=2)
        assert stack.job(waiting)["state"] == "queued"
        redis_server.kill()
        t_fault = time.monotonic()
        assert stack.job(running)["state"] == "running"
        redis_server.start()  # same port, nothing in it
        stack.wait(waiting, lambda j: j["state"] != "queued", "the lost job to be re-sent")
        record(
            "Redis restart (no persistence)",
            "fault → lost queued job running",
            time.monotonic() - t_fault,
        )
        jobs = [stack.finished(running), stack.finished(waiting)]
        record(
            "Redis restart (no persistence)",
            "fault → both jobs succeeded",
            time.monotonic() - t_fault,
        )
        for job in jobs:
            assert job["state"] == "succeeded", job["error"]
            assert stack.finished_runs(job["id"]) == ["succeeded"]
        assert jobs[0]["attempts"] == 1  # the running job was never interrupted
        resent = [
            line
            for line in stack.workers[0].log_path.read_text().splitlines()
            if "re-sent queued jobs the broker lost" in line
        ]
        assert resent, "the waiting job was not recovered by the reaper"
        assert sorted(stack.published()) == sorted([running, waiting])
        r = stack.http.get("/readyz")
        assert r.status_code == 200, r.text
    finally:
        redis_server.kill()


def test_api_restart_during_polling_does_not_touch_jobs(
    stack: ServiceStack, record: Callable[..., None], tmp_path: Path
) -> None:
    """Fault 4: the API is killed and started again while a client polls a running job."""
    api = stack.start_api()
    stack.start_worker()
    job_id = stack.submit(recon_iters=25)
    stack.wait(job_id, lambda j: j["stage"] == "reconstruction", "the job to run")
    seen = [stack.job(job_id)["progress"]]
    api.kill()
    t_fault = time.monotonic()
    restarted = False
    outage_errors = 0
    while True:  # the client's poll loop: retry while the API is away
        try:
            job = stack.job(job_id)
        except httpx.TransportError:
            outage_errors += 1
            if not restarted:
                stack.start_api()  # returns once /healthz answers
                restarted = True
            time.sleep(0.1)
            continue
        if restarted and len(seen) == 1:
            record(
                "API kill -9 + restart", "fault → polling answers again", time.monotonic() - t_fault
            )
        seen.append(job["progress"])
        if job["state"] in FINISHED:
            break
        time.sleep(0.2)
    assert outage_errors >= 1  # the client did see the API go away
    assert job["state"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["metrics"]["resumed_units"] == 0
    assert seen == sorted(seen)  # progress never went backwards across the restart
    stack.download_and_verify(job_id, tmp_path / "artifact")


def _problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in r.text
    return dict(r.json())


def test_postgres_outage_is_503_and_recovers_by_itself(
    make_stack: Callable[..., ServiceStack],
    broker_url: str,
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    """Fault 5: PostgreSQL stops mid-job: the API answers 503 problem+json and /readyz
    fails; once it is back, the API and the job recover without anyone stepping in."""
    cluster = PgCluster()
    try:
        cluster.start()
        upgrade(Settings(database_url=cluster.url))
        stack = make_stack(cluster.url, broker_url)
        stack.start_api()
        stack.start_worker()
        job_id = stack.submit(recon_iters=25)
        stack.wait(job_id, lambda j: j["stage"] == "reconstruction", "the job to run")
        cluster.stop()
        t_fault = time.monotonic()

        p = _problem(stack.http.get(f"/jobs/{job_id}"), 503)
        assert p["type"].endswith("/unavailable")
        r = stack.http.get("/jobs")
        _problem(r, 503)
        assert int(r.headers["retry-after"]) > 0
        body = {
            "model": {"arch": "d4c-tiny-vit", "pretrained": "builtin"},
            "recipe": {"quant": {"weight_bits": 8, "act_bits": 8}},
        }
        _problem(stack.http.post("/jobs", json=body), 503)
        assert _problem(stack.http.get("/readyz"), 503)["detail"].startswith("database")
        assert stack.http.get("/healthz").status_code == 200
        time.sleep(max(0.0, 3 - (time.monotonic() - t_fault)))  # a few seconds of outage

        cluster.start()
        t_back = time.monotonic()
        record("PostgreSQL stopped ~3 s", "fault → database back", t_back - t_fault)

        def api_ok() -> bool:
            return stack.http.get(f"/jobs/{job_id}").status_code == 200

        wait_for(api_ok, 60, "the API to read jobs again")
        record(
            "PostgreSQL stopped ~3 s", "database back → API answers 200", time.monotonic() - t_back
        )
        wait_for(lambda: stack.http.get("/readyz").status_code == 200, 60, "/readyz")
        job = stack.finished(job_id)
        record(
            "PostgreSQL stopped ~3 s", "database back → job succeeded", time.monotonic() - t_back
        )
        assert job["state"] == "succeeded", job["error"]
        stack.download_and_verify(job_id, tmp_path / "artifact")
        with sync_sessionmaker(stack.settings)() as db:  # the 503'd POST stored nothing
            assert db.scalar(select(func.count()).select_from(Job)) == 1
        assert stack.finished_runs(job_id).count("succeeded") == 1
    finally:
        cluster.remove()


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")


def test_full_or_read_only_artifact_storage_fails_clearly_and_lists_nothing(
    stack: ServiceStack, record: Callable[..., None], tmp_path: Path
) -> None:
    """Fault 6: the artifact root is a tiny filesystem (full), then read-only: each job fails
    with a clear storage problem and no artifact is ever listed or served; after space is
    freed the next job succeeds with the same worker."""
    root = stack.settings.artifacts_dir
    root.mkdir(parents=True)
    _mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root)])
    try:
        stack.start_api()
        stack.start_worker()
        for fault, remount, reason in (
            ("artifact storage full", None, "no space left"),
            ("artifact storage read-only", "remount,ro", "read-only"),
        ):
            if remount:
                _mount(["-o", remount, str(root)])
            t_fault = time.monotonic()
            job_id = stack.submit(recon_iters=2)

            def ended(job: dict[str, Any], job_id: str = job_id) -> bool:
                r = stack.http.get(f"/jobs/{job_id}/artifacts")
                # 409 until it has finished, then no file: never partial
                assert r.status_code == 409 or (r.status_code, r.json()) == (200, []), r.text
                return job["state"] in FINISHED

            job = stack.wait(job_id, ended, f"{fault}: the job to end")
            record(fault, "submit → job failed with a storage problem", time.monotonic() - t_fault)
            assert job["state"] == "failed", job
            assert job["error"]["type"].endswith("/storage-error"), job["error"]
            assert reason in job["error"]["detail"] and str(root) not in job["error"]["detail"]
            for name in ARTIFACTS:
                r = stack.http.get(f"/jobs/{job_id}/artifacts/{name}")
                assert r.status_code in (404, 409) and r.headers["content-type"].startswith(
                    "application/problem+json"
                )
            assert stack.published() == [] and stack.staging_leftovers() == []

        _mount(["-o", "remount,rw,size=256m", str(root)])
        t_freed = time.monotonic()
        job_id = stack.submit(recon_iters=2)
        job = stack.finished(job_id)
        record(
            "artifact storage full/read-only",
            "space freed → next job succeeded",
            time.monotonic() - t_freed,
        )
        assert job["state"] == "succeeded", job["error"]
        stack.download_and_verify(job_id, tmp_path / "artifact")
        assert stack.published() == [job_id]
    finally:
        for proc in stack.workers:
            proc.stop()
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
