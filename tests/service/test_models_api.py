"""POST /models: safetensors uploads, streamed, capped, hashed and load-checked."""

from __future__ import annotations

import hashlib
import io
from functools import cache
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save as st_save
from sqlalchemy import func, select

from app.db.models import Checkpoint
from tests.service.conftest import Tenant
from tests.service.test_jobs_api import assert_problem

pytestmark = pytest.mark.anyio

OCTET = {"Content-Type": "application/octet-stream"}


@cache
def _state(arch: str) -> dict[str, torch.Tensor]:
    from d4c_core.models import create_architecture

    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in create_architecture(arch).state_dict().items()}


@cache
def tiny_checkpoint_bytes(arch: str = "d4c-tiny-vit") -> bytes:
    return st_save(_state(arch))


def kept(db: Any, settings: Any) -> tuple[int, list[str]]:
    with db.connect() as conn:
        rows = int(conn.scalar(select(func.count()).select_from(Checkpoint)))
    folder = settings.checkpoints_dir
    files = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    return rows, files


async def upload(
    client: httpx.AsyncClient, t: Tenant, data: bytes, arch: str = "d4c-tiny-vit", **h: str
) -> httpx.Response:
    return await client.post(
        "/models", params={"arch": arch}, content=data, headers={**t.headers, **OCTET, **h}
    )


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)
async def test_upload_good_checkpoint(
    client: httpx.AsyncClient, tenant: Tenant, settings: Any
) -> None:
    data = tiny_checkpoint_bytes()
    r = await upload(client, tenant, data)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["arch"] == "d4c-tiny-vit"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["size_bytes"] == len(data)
    assert r.headers["location"] == f"/models/{body['checkpoint_id']}"
    stored = settings.checkpoint_path(body["checkpoint_id"])
    assert stored.read_bytes() == data
    assert [p.name for p in settings.checkpoints_dir.iterdir()] == [stored.name]  # no temp left
    got = await client.get(f"/models/{body['checkpoint_id']}", headers=tenant.headers)
    assert got.json() == body


def _pickle_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(_state("d4c-tiny-vit"), buf)
    return buf.getvalue()


BAD_UPLOADS = {
    "pickle": (_pickle_bytes, "d4c-tiny-vit", 422),
    "truncated": (lambda: tiny_checkpoint_bytes()[:-1000], "d4c-tiny-vit", 422),
    "garbage": (lambda: b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage", "d4c-tiny-vit", 422),
    "wrong_shapes": (lambda: tiny_checkpoint_bytes("d4c-tiny-rn"), "d4c-tiny-vit", 422),
    "empty": (lambda: b"", "d4c-tiny-vit", 422),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
async def test_bad_uploads_keep_nothing(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Any, case: str
) -> None:
    make, arch, status = BAD_UPLOADS[case]
    before = kept(db, settings)
    r = await upload(client, tenant, make(), arch)
    assert_problem(r, status)
    assert kept(db, settings) == before


async def test_over_cap_and_wrong_requests(
    client: httpx.AsyncClient, tenant: Tenant, db: Any, settings: Any
) -> None:
    data = tiny_checkpoint_bytes()
    settings.max_upload_bytes = len(data) - 1
    before = kept(db, settings)
    assert_problem(await upload(client, tenant, data), 413)  # declared Content-Length

    async def chunks() -> Any:  # no Content-Length: the stream itself is capped
        for i in range(0, len(data), 65536):
            yield data[i : i + 65536]

    r = await client.post(
        "/models",
        params={"arch": "d4c-tiny-vit"},
        content=chunks(),
        headers={**tenant.headers, **OCTET},
    )
    assert_problem(r, 413)
    assert kept(db, settings) == before

    settings.max_upload_bytes = 10**9
    p = assert_problem(await upload(client, tenant, data, arch="no-such-arch"), 422)
    assert p["errors"][0]["field"] == "arch"
    r = await client.post(
        "/models",
        params={"arch": "d4c-tiny-vit"},
        files={"file": ("m.safetensors", data)},
        headers=tenant.headers,
    )
    assert_problem(r, 415)
    assert_problem(
        await client.post("/models", content=data, headers={**tenant.headers, **OCTET}), 422
    )
    assert kept(db, settings) == before
