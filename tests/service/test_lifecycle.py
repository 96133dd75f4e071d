"""A job's whole life through HTTP with a real ``d4c worker`` process, PostgreSQL and Redis.

The API runs in-process (the real app, real enqueue to Redis); the worker is a subprocess
(prefork, one child) exactly as deployed. Jobs are test-sized through the body alone
(``calibration`` budgets and the ``quant`` search sizes), so the stored recipe is exactly the
one the API validated.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.cli import create_key
from app.core.config import Settings, get_settings
from app.main import create_app
from d4c_core.artifacts import verify
from tests.support.jobs import job_body, job_row
from tests.support.procs import Process, service_env, wait_for
from tests.support.redisdb import redis_database

JOB_TIMEOUT_S = 150
FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    settings: Settings
    worker: Process
    client: TestClient
    headers: dict[str, str]
    env: dict[str, str]


@pytest.fixture(scope="module")
def stack(module_pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + a real `d4c worker` on a database of this module's own: the worker's reaper
    re-sends every queued job it finds, including ones other modules left behind."""
    pg_url = module_pg_url
    data_dir = tmp_path_factory.mktemp("lifecycle") / "data"
    with redis_database() as broker_url, pytest.MonkeyPatch.context() as mp:
        env = service_env(data_dir, pg_url, broker_url)
        for k, v in env.items():
            if k.startswith("D4C_"):
                mp.setenv(k, v)
        get_settings.cache_clear()
        settings = get_settings()
        worker = Process(["worker"], env, data_dir.parent / "worker.log")
        app = create_app(settings)  # real enqueue, to this test's Redis database
        stack: Stack | None = None
        try:
            with TestClient(app) as client:
                key = create_key(f"lifecycle-{os.getpid()}", settings)
                headers = {"Authorization": f"Bearer {key}"}
                stack = Stack(settings, worker, client, headers, env)
                yield stack
        finally:
            (stack.worker if stack is not None else worker).stop()  # a test may replace it
            get_settings.cache_clear()


def _submit(stack: Stack, recon_iters: int, exports: tuple[str, ...] = ()) -> str:
    body = job_body(recon_iters, exports=exports)
    r = stack.client.post("/jobs", json=body, headers=stack.headers)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/jobs/{r.json()['id']}"
    return str(r.json()["id"])


def _get(stack: Stack, job_id: str) -> dict[str, Any]:
    r = stack.client.get(f"/jobs/{job_id}", headers=stack.headers)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_state(stack: Stack, job_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        job = _get(stack, job_id)
        if stack.worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{stack.worker.log_tail()}")
        return job if job["state"] in states else None

    try:
        return dict(wait_for(done, JOB_TIMEOUT_S, f"job {job_id} to be {states}", every=0.3))
    except AssertionError:
        print(stack.worker.log_tail())
        raise


def test_submit_run_download_verify(stack: Stack, tmp_path: Path) -> None:
    """The whole round trip, with the recipe's ONNX export: listed, served and checked."""
    job_id = _submit(stack, recon_iters=2, exports=("onnx",))
    job = _wait_state(stack, job_id, FINISHED)
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and job["error"] is None and job["attempts"] == 1
    assert job["metrics"]["embedding_cosine"]["image"] > 0.9
    assert job["metrics"]["resumed_units"] == 0

    r = stack.client.get(f"/jobs/{job_id}/artifacts", headers=stack.headers)
    assert r.status_code == 200
    listing = {a["name"]: a for a in r.json()}
    assert set(listing) == {
        "model.safetensors",
        "manifest.json",
        "report.json",
        "calibration.png",
        "image_encoder.onnx",
        "text_encoder.onnx",
    }
    out = tmp_path / "artifact"
    out.mkdir()
    for name, entry in listing.items():
        r = stack.client.get(f"/jobs/{job_id}/artifacts/{name}", headers=stack.headers)
        assert r.status_code == 200
        digest = hashlib.sha256(r.content).hexdigest()
        assert digest == entry["sha256"] == r.headers["etag"].strip('"')
        assert len(r.content) == entry["size_bytes"]
        (out / name).write_bytes(r.content)
    manifest = verify(out)
    assert manifest["recipe"] == job["recipe"]
    assert {"image_encoder.onnx", "text_encoder.onnx"} <= set(manifest["files"])
    cosine = json.loads((out / "report.json").read_text())["onnx"]["cosine"]
    assert cosine["image"]["min"] >= 0.999 and cosine["text"]["min"] >= 0.999, cosine

    # Finished: nothing left to resume, nothing half-published.
    assert not (stack.settings.work_dir / job_id).exists()
    assert not any((stack.settings.artifacts_dir / ".staging").iterdir())


def test_cancel_mid_run_stops_at_a_unit_boundary(stack: Stack) -> None:
    job_id = _submit(stack, recon_iters=300)
    _wait_state_stage(stack, job_id, "reconstruction")
    t0 = time.monotonic()
    r = stack.client.post(f"/jobs/{job_id}/cancel", headers=stack.headers)
    assert r.status_code == 200, r.text
    job = _wait_state(stack, job_id, FINISHED)
    assert job["state"] == "cancelled", job
    assert time.monotonic() - t0 < 30  # one unit, not the rest of the job
    assert job["error"] is None and job["stage"] == "reconstruction" and job["progress"] < 0.9
    r = stack.client.get(f"/jobs/{job_id}/artifacts", headers=stack.headers)
    assert r.status_code == 200 and r.json() == []
    r = stack.client.get(f"/jobs/{job_id}/artifacts/model.safetensors", headers=stack.headers)
    assert r.status_code == 404
    assert not (stack.settings.work_dir / job_id).exists()
    assert not (stack.settings.artifacts_dir / job_id).exists()
    assert job_row(stack.settings, job_id).cancel_requested


def _wait_state_stage(stack: Stack, job_id: str, stage: str) -> None:
    def check() -> dict[str, Any] | None:
        job = _get(stack, job_id)
        return job if job["stage"] == stage or job["state"] in FINISHED else None

    job = wait_for(check, JOB_TIMEOUT_S, f"job {job_id} to reach {stage}", every=0.2)
    assert (job["state"], job["stage"]) == ("running", stage), job
