"""DELETE /models/{id} (refused while a job uses it) and the per-tenant upload quota."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import httpx
import pytest

from app.api.routes import models as models_route
from app.core.config import Settings
from app.db.models import Checkpoint
from app.db.models import Tenant as TenantRow
from app.db.session import sync_sessionmaker
from tests.service.conftest import TINY_JOB, Tenant, set_job
from tests.service.test_jobs_api import assert_problem
from tests.service.test_models_api import kept, tiny_checkpoint_bytes, upload

pytestmark = pytest.mark.anyio
both_backends = pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)


def checkpoint_job(ck: str) -> dict[str, Any]:
    return {**TINY_JOB, "model": {"arch": "d4c-tiny-vit", "checkpoint_id": ck}}


async def uploaded(client: httpx.AsyncClient, tenant: Tenant) -> str:
    r = await upload(client, tenant, tiny_checkpoint_bytes())
    assert r.status_code == 201, r.text
    return str(r.json()["checkpoint_id"])


@both_backends
async def test_delete_a_checkpoint_removes_file_and_row(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    before = kept(db, settings)
    ck = await uploaded(client, tenant)
    r = await client.delete(f"/models/{ck}", headers=tenant.headers)
    assert r.status_code == 204, r.text
    assert kept(db, settings) == before
    assert not settings.checkpoint_path(ck).exists()
    assert_problem(await client.get(f"/models/{ck}", headers=tenant.headers), 404)
    assert_problem(await client.delete(f"/models/{ck}", headers=tenant.headers), 404)
    p = assert_problem(
        await client.post("/jobs", json=checkpoint_job(ck), headers=tenant.headers), 422
    )
    assert p["errors"][0]["field"] == "model.checkpoint_id"


@both_backends
async def test_a_checkpoint_in_use_by_an_active_job_is_409(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Settings
) -> None:
    ck = await uploaded(client, tenant)
    other = await uploaded(client, tenant)
    job = await client.post("/jobs", json=checkpoint_job(ck), headers=tenant.headers)
    assert job.status_code == 202, job.text
    jid = job.json()["id"]
    for state in ("queued", "running"):
        set_job(db, jid, state=state)
        p = assert_problem(await client.delete(f"/models/{ck}", headers=tenant.headers), 409)
        assert p["type"] == "/problems/checkpoint-in-use" and jid in p["detail"]
        assert settings.checkpoint_path(ck).is_file()
    # Another checkpoint of the same tenant is not held by that job.
    assert (await client.delete(f"/models/{other}", headers=tenant.headers)).status_code == 204
    set_job(db, jid, state="succeeded")
    assert (await client.delete(f"/models/{ck}", headers=tenant.headers)).status_code == 204


async def test_another_tenants_checkpoint_is_404(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any, settings: Settings
) -> None:
    ck = await uploaded(client, tenant)
    intruder = make_tenant()
    theirs = await client.delete(f"/models/{ck}", headers=intruder.headers)
    missing = await client.delete(f"/models/{'0' * 32}", headers=intruder.headers)
    assert_problem(theirs, 404)
    assert theirs.json() | {"instance": None} == missing.json() | {"instance": None}
    assert settings.checkpoint_path(ck).is_file()


@both_backends
async def test_a_job_submitted_while_its_checkpoint_is_deleted_is_never_queued(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    """POST /jobs and DELETE /models race: either the job is accepted and the delete is 409,
    or the delete wins and the job is 422; never a queued job without its checkpoint."""
    for _ in range(3):
        ck = await uploaded(client, tenant)
        job, gone = await asyncio.gather(
            client.post("/jobs", json=checkpoint_job(ck), headers=tenant.headers),
            client.delete(f"/models/{ck}", headers=tenant.headers),
        )
        assert (job.status_code, gone.status_code) in ((202, 409), (422, 204)), (job, gone)
        assert settings.checkpoint_path(ck).is_file() is (job.status_code == 202)


async def test_openapi_documents_delete_model(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()["paths"]["/models/{checkpoint_id}"]
    assert set(doc["delete"]["responses"]) >= {"204", "404", "409", "422"}


def _quota_problem(r: httpx.Response) -> dict[str, Any]:
    p = assert_problem(r, 413)
    assert p["title"] == "Upload quota exceeded"
    assert p["type"] == "/problems/upload-quota-exceeded"
    assert "DELETE /models/" in p["detail"]
    return p


@both_backends
async def test_upload_quota_per_tenant_and_delete_frees_it(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any, db: Any, settings: Settings
) -> None:
    data = tiny_checkpoint_bytes()
    settings.max_upload_bytes_per_tenant = 2 * len(data) + 10
    ck = await uploaded(client, tenant)
    await uploaded(client, tenant)
    before = kept(db, settings)
    _quota_problem(await upload(client, tenant, data))  # declared Content-Length

    async def chunks() -> Any:  # undeclared length: the stream is cut at the quota
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = await client.post(
        "/models",
        params={"arch": "d4c-tiny-vit"},
        content=chunks(),
        headers={**tenant.headers, "Content-Type": "application/octet-stream"},
    )
    assert "at least" in _quota_problem(r)["detail"]
    assert kept(db, settings) == before
    # The quota is per tenant: another one still has all of it.
    assert (await upload(client, make_tenant(), data)).status_code == 201
    # Deleting a checkpoint frees its bytes.
    assert (await client.delete(f"/models/{ck}", headers=tenant.headers)).status_code == 204
    assert (await upload(client, tenant, data)).status_code == 201


@both_backends
async def test_the_quota_is_rechecked_under_the_lock_before_commit(
    client: httpx.AsyncClient,
    tenant: Tenant,
    db: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A concurrent upload of the same tenant commits while this one is being checked: the
    room seen before streaming is gone, and this one must be refused with nothing kept."""
    data = tiny_checkpoint_bytes()
    settings.max_upload_bytes_per_tenant = len(data) + 10
    real_check = models_route.check_checkpoint

    def check_while_another_commits(path: Any, arch: str) -> None:
        real_check(path, arch)
        with sync_sessionmaker(settings)() as s, s.begin():
            tid = s.query(TenantRow.id).filter(TenantRow.name == tenant.name).scalar()
            sha = hashlib.sha256(b"other").hexdigest()
            s.add(Checkpoint(tenant_id=tid, arch=arch, sha256=sha, size_bytes=len(data)))

    monkeypatch.setattr(models_route, "check_checkpoint", check_while_another_commits)
    rows_before, files_before = kept(db, settings)
    _quota_problem(await upload(client, tenant, data))
    assert kept(db, settings) == (rows_before + 1, files_before)  # only the other one's row
