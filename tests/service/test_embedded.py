"""The embedded default: SQLite, the filesystem broker, a worker inside the API process.

One test drives the in-process worker directly (start, run, stop mid-job, restart, resume);
one runs ``d4c submit`` exactly as the README does, against a private ``d4c serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.core.config import Settings, get_settings
from app.db.migrate import upgrade
from app.queue import send
from d4c_core.artifacts import verify
from tests.support.jobs import insert_job, job_row, tiny_recipe
from tests.support.procs import service_env, wait_for
from worker.inprocess import start_worker_thread

FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture
def embedded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    env = service_env(tmp_path / "data", None, None, D4C_WORKER_REQUEUE_QUEUED_AFTER_S="1")
    for k in [k for k in os.environ if k.startswith("D4C_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("D4C_"):
            monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    settings = get_settings()
    assert settings.embedded
    upgrade(settings)
    yield settings
    get_settings.cache_clear()


def test_in_process_worker_runs_stops_and_resumes(embedded: Settings) -> None:
    settings = embedded
    worker = start_worker_thread(settings)
    try:
        quick = insert_job(settings, tiny_recipe())
        assert send(quick)
        job = wait_for(lambda: _finished(settings, quick), 120, "the first job")
        assert job.state == "succeeded", job.error
        # Sent only now: the filesystem broker orders two messages sent in the same
        # millisecond by a random uuid, so sending both at once let this one run first.
        # 100 iterations: a poll sees it mid-reconstruction even on a fast, quiet machine.
        long = insert_job(settings, tiny_recipe(recon_iters=100))
        assert send(long)
        # Stop mid-reconstruction: the job goes back to the queue, its units stay on disk.
        try:
            wait_for(lambda: _units_done(settings, long) >= 2, 120, "a few finished units")
        except AssertionError:
            row = job_row(settings, long)
            print("long job:", row.state, row.stage, row.progress, row.attempts, row.worker)
            raise
    finally:
        worker.stop()
    row = job_row(settings, long)
    assert (row.state, row.worker) == ("queued", None), row.error
    done_before = _units_done(settings, long)
    assert done_before >= 2

    # A new worker (next `d4c serve`): the filesystem broker dropped the message when it was
    # fetched, so the reaper re-sends the queued job; the run resumes, not restarts.
    worker = start_worker_thread(settings)
    try:
        job = wait_for(lambda: _finished(settings, long), 180, "the resumed job")
    finally:
        worker.stop()
    assert job.state == "succeeded", job.error
    assert job.attempts == 2
    assert job.metrics["resumed_units"] >= done_before
    assert not (settings.work_dir / long).exists()


def _finished(settings: Settings, job_id: str) -> object:
    job = job_row(settings, job_id)
    return job if job.state in FINISHED else None


def _units_done(settings: Settings, job_id: str) -> int:
    row = job_row(settings, job_id)
    assert row.state not in FINISHED, (row.state, row.error, row.attempts)  # fail fast
    units = settings.work_dir / job_id / "units"
    return len(list(units.glob("*.safetensors"))) if units.is_dir() else 0


@pytest.mark.slow  # ~2 min on 2 shared cores: range init runs at the API's full search size
def test_d4c_submit_against_a_private_embedded_server(tmp_path: Path) -> None:
    """The README's main job, at test size: serve, submit, follow, download, verify."""
    env = service_env(tmp_path / "data", None, None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "d4c_core.cli",
            "submit",
            "--model",
            "d4c-tiny-vit",
            "--bits",
            "w4a8",
            "--images",
            "8",
            "--prompts",
            "8",
            "--recon-iters",
            "1",
            "--out",
            str(out),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    log = tmp_path / "data" / "submit-serve.log"
    assert proc.returncode == 0, proc.stderr[-3000:] + (
        log.read_text()[-3000:] if log.exists() else ""
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded"
    manifest = verify(out)
    assert (
        summary["sha256"]["model.safetensors"] == manifest["files"]["model.safetensors"]["sha256"]
    )
