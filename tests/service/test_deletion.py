"""DELETE /jobs/{id}: tombstone + files removed, 410 afterwards, safe against a download in
flight and against a worker finishing (or publishing late) at the same moment."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select

import d4c_core.artifacts
import d4c_core.pipeline
from app import deletion
from app.core.config import Settings
from app.db.models import Artifact, Job, utcnow
from app.db.session import sync_sessionmaker
from app.storage import ArtifactStore
from tests.service.conftest import Tenant, set_job
from tests.service.test_auth_isolation import add_artifact
from tests.service.test_jobs_api import assert_problem, submit
from tests.support.jobs import insert_job, job_row, tiny_recipe
from worker import tasks
from worker.lease import Lease
from worker.tasks import JobRunner

pytestmark = pytest.mark.anyio
both_backends = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)

MISSING = "0" * 32


def artifact_rows(db: Any, job_id: str) -> int:
    with db.connect() as conn:
        q = select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)
        return int(conn.scalar(q))


async def finished_job(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings, data: bytes
) -> str:
    """A succeeded job with two artifacts and a leftover work dir (as a dead worker leaves)."""
    jid = str((await submit(client, tenant))["id"])
    add_artifact(db, settings, jid, "model.safetensors", data)
    add_artifact(db, settings, jid, "manifest.json", b"{}")
    set_job(db, jid, state="succeeded", progress=1.0, finished_at=utcnow())
    work = settings.work_dir / jid
    work.mkdir(parents=True)
    (work / "unit-0.pt").write_bytes(b"checkpoint")
    return jid


@both_backends
async def test_delete_a_finished_job_keeps_a_tombstone_and_removes_its_files(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    jid = await finished_job(client, tenant, db, settings, b"weights")
    r = await client.delete(f"/jobs/{jid}", headers=tenant.headers)
    assert r.status_code == 204, r.text
    assert r.content == b""

    job = (await client.get(f"/jobs/{jid}", headers=tenant.headers)).json()
    assert job["state"] == "succeeded" and job["deleted_at"] is not None
    listed = (await client.get("/jobs", headers=tenant.headers)).json()["items"]
    assert [j["deleted_at"] for j in listed if j["id"] == jid] == [job["deleted_at"]]
    for path in (f"/jobs/{jid}/artifacts", f"/jobs/{jid}/artifacts/model.safetensors"):
        p = assert_problem(await client.get(path, headers=tenant.headers), 410)
        assert p["type"] == "/problems/artifacts-deleted" and p["title"] == "Gone"
    assert artifact_rows(db, jid) == 0
    assert not (settings.artifacts_dir / jid).exists()
    assert not (settings.work_dir / jid).exists()
    assert job_row(settings, jid).purged_at is not None

    # Idempotent: a retry (say, after a lost response) is 204 again and changes nothing.
    again = await client.delete(f"/jobs/{jid}", headers=tenant.headers)
    assert again.status_code == 204
    assert (await client.get(f"/jobs/{jid}", headers=tenant.headers)).json() == job


@both_backends
async def test_an_active_job_is_409_and_keeps_everything(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    jid = str((await submit(client, tenant))["id"])
    for state in ("queued", "running"):
        set_job(db, jid, state=state)
        p = assert_problem(await client.delete(f"/jobs/{jid}", headers=tenant.headers), 409)
        assert p["type"] == "/problems/job-active"
        assert f"POST /jobs/{jid}/cancel" in p["detail"]
    assert job_row(settings, jid).deleted_at is None


async def test_another_tenants_job_is_404_like_a_missing_one(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any, db: Any, settings: Settings
) -> None:
    jid = await finished_job(client, tenant, db, settings, b"weights")
    intruder = make_tenant()
    theirs = await client.delete(f"/jobs/{jid}", headers=intruder.headers)
    missing = await client.delete(f"/jobs/{MISSING}", headers=intruder.headers)
    assert_problem(theirs, 404)
    assert theirs.json() | {"instance": None} == missing.json() | {"instance": None}
    assert_problem(await client.delete("/jobs/a%2Fb", headers=tenant.headers), 404)
    assert_problem(await client.delete("/jobs/a%00b", headers=tenant.headers), 422)
    assert job_row(settings, jid).deleted_at is None
    assert ArtifactStore(settings).path(jid, "model.safetensors").is_file()


def _scope(path: str, tenant: Tenant) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), (b"authorization", f"Bearer {tenant.key}".encode())],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }


@both_backends
async def test_a_download_in_flight_completes_when_the_job_is_deleted_mid_stream(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    """The DELETE runs between two body chunks of a download (driven at the ASGI level, so
    the interleaving is exact): the download still delivers every byte; the next is 410."""
    data = os.urandom(1_000_000)  # ~16 chunks of 64 KiB
    jid = await finished_job(client, tenant, db, settings, data)
    status: list[int] = []
    body: list[bytes] = []
    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if len(body) == 1:
                r = await client.delete(f"/jobs/{jid}", headers=tenant.headers)
                status.append(r.status_code)
                assert not (settings.artifacts_dir / jid).exists()

    app = client.app  # type: ignore[attr-defined]
    await app(_scope(f"/jobs/{jid}/artifacts/model.safetensors", tenant), receive, send)
    assert status == [200, 204]
    assert len(body) > 2 and b"".join(body) == data
    r = await client.get(f"/jobs/{jid}/artifacts/model.safetensors", headers=tenant.headers)
    assert_problem(r, 410)


@both_backends
async def test_a_delete_between_the_check_and_the_open_is_a_clean_410(
    client: httpx.AsyncClient,
    tenant: Tenant,
    db: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another API process deletes the job after this download read the rows but before it
    opened the file: a 410 problem, never a 500 or a 200 with a short body."""
    jid = await finished_job(client, tenant, db, settings, b"weights")
    real_open = ArtifactStore.open

    def open_after_a_delete(store: ArtifactStore, job_id: str, name: str) -> Any:
        set_job(db, job_id, deleted_at=utcnow())
        with db.begin() as conn:
            conn.execute(delete(Artifact).where(Artifact.job_id == job_id))
        deletion.purge_files(settings, job_id)
        return real_open(store, job_id, name)

    monkeypatch.setattr(ArtifactStore, "open", open_after_a_delete)
    r = await client.get(f"/jobs/{jid}/artifacts/model.safetensors", headers=tenant.headers)
    assert assert_problem(r, 410)["type"] == "/problems/artifacts-deleted"


@both_backends
async def test_a_delete_racing_the_workers_finish_never_loses_to_it(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    """The worker publishes and commits `succeeded` + artifact rows while the client keeps
    sending DELETE: every answer is 409 (still running) until one 204, and afterwards no
    artifact row, file or directory of the job is left."""
    store = ArtifactStore(settings)
    for _ in range(5):
        jid = str((await submit(client, tenant))["id"])
        set_job(db, jid, state="running", worker="w1", heartbeat_at=utcnow())
        staging = store.staging_dir(jid)
        staging.mkdir()
        for name in ("model.safetensors", "manifest.json"):
            (staging / name).write_bytes(os.urandom(100_000))
        lease = Lease(sync_sessionmaker(settings), jid, "w1", settings.stale_after_s)

        def finish(lease: Lease = lease, jid: str = jid, staging: Path = staging) -> None:
            lease.succeed({}, store.publish(jid, staging))

        worker = asyncio.create_task(asyncio.to_thread(finish))
        answers = []
        while not answers or answers[-1] == 409:
            r = await client.delete(f"/jobs/{jid}", headers=tenant.headers)
            answers.append(r.status_code)
            await asyncio.sleep(0.001)
        await worker
        assert set(answers[:-1]) <= {409} and answers[-1] == 204, answers
        row = job_row(settings, jid)
        assert row.state == "succeeded" and row.deleted_at is not None
        assert row.finished_at is not None and row.finished_at <= row.deleted_at
        assert artifact_rows(db, jid) == 0
        assert not (settings.artifacts_dir / jid).exists() and not staging.exists()


def _fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline that writes a work dir checkpoint and a complete staging dir at once."""

    def run(spec: Any, work: Path, staging: Path, *hooks: Any) -> dict[str, Any]:
        work.mkdir(parents=True, exist_ok=True)
        (work / "unit-0.pt").write_bytes(b"checkpoint")
        staging.mkdir(parents=True)
        (staging / "model.safetensors").write_bytes(b"late weights")
        (staging / "manifest.json").write_bytes(b"{}")
        return {"metrics": {}, "timings": {}}

    monkeypatch.setattr(d4c_core.pipeline, "run", run)
    monkeypatch.setattr(d4c_core.artifacts, "verify", lambda _dir: None)


@both_backends
@pytest.mark.parametrize("deleted", [True, False])
def test_a_worker_that_lost_its_claim_cannot_resurrect_a_deleted_job(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, deleted: bool
) -> None:
    """Worker w1 passes its last claim check, then stalls; meanwhile the job is taken over by
    w2, finished and (or not) deleted. w1 then publishes: for a deleted job nothing of it may
    stay on disk; for a live one, the files are left to their owner."""
    _fake_pipeline(monkeypatch)
    job_id = insert_job(settings, tiny_recipe())

    def stalled_check(lease: Lease) -> bool:
        now = utcnow()
        tomb = {"deleted_at": now, "purged_at": now} if deleted else {}
        with sync_sessionmaker(settings)() as db, db.begin():
            job = db.get(Job, job_id)
            assert job is not None
            for k, v in {"state": "succeeded", "worker": "w2", "finished_at": now, **tomb}.items():
                setattr(job, k, v)
        return True

    monkeypatch.setattr(tasks, "_still_mine", stalled_check)
    assert JobRunner(settings, "w1").run(job_id) == "lost"
    assert job_row(settings, job_id).worker == "w2"
    published = settings.artifacts_dir / job_id
    assert published.exists() is not deleted
    assert (settings.work_dir / job_id).exists() is not deleted
    staging_root = settings.artifacts_dir / ".staging"
    assert not deleted or list(staging_root.iterdir()) == []


async def test_openapi_documents_delete_and_gone(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert set(paths["/jobs/{job_id}"]["delete"]["responses"]) >= {"204", "404", "409", "422"}
    assert "410" in paths["/jobs/{job_id}/artifacts"]["get"]["responses"]
    download = paths["/jobs/{job_id}/artifacts/{name}"]["get"]["responses"]
    assert {"206", "410", "416"} <= set(download)


async def test_single_byte_ranges_still_work(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    data = bytes(range(256)) * 1000
    jid = await finished_job(client, tenant, db, settings, data)
    url = f"/jobs/{jid}/artifacts/model.safetensors"
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    cases = {"bytes=10-19": data[10:20], "bytes=255990-": data[255990:], "bytes=-5": data[-5:]}
    for spec, want in cases.items():
        r = await client.get(url, headers={**tenant.headers, "Range": spec})
        assert r.status_code == 206 and r.content == want, spec
        assert r.headers["content-range"].endswith(f"/{len(data)}")
        assert r.headers["etag"] == etag
    stale = await client.get(
        url, headers={**tenant.headers, "Range": "bytes=0-9", "If-Range": '"x"'}
    )
    assert stale.status_code == 200 and stale.content == data
    r = await client.get(url, headers={**tenant.headers, "Range": f"bytes={len(data)}-"})
    assert assert_problem(r, 416) and r.headers["content-range"] == f"bytes */{len(data)}"
    whole = await client.get(url, headers=tenant.headers)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["content-length"] == str(len(data))
    assert whole.headers["content-disposition"] == 'attachment; filename="model.safetensors"'
