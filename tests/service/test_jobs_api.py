"""POST/GET /jobs, pagination, validation, idempotency, cancel, limits, events."""

from __future__ import annotations

import copy
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.db.models import Job
from d4c_core.recipe import Recipe
from tests.service.conftest import TINY_JOB, Queue, Tenant, set_job

pytestmark = pytest.mark.anyio


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def job_body(**changes: Any) -> dict[str, Any]:
    """TINY_JOB with ``changes``: top-level values replaced, ``recipe`` merged into its own
    (``recipe={"seed": 1}`` keeps the test-sized settings)."""
    body = copy.deepcopy(TINY_JOB)
    for k, v in changes.items():
        body[k] = _merge(body[k], v) if k == "recipe" and isinstance(v, dict) else v
    return body


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    p = r.json()
    assert p["status"] == status and isinstance(p["title"], str) and "type" in p
    return p


async def submit(client: httpx.AsyncClient, t: Tenant, **changes: Any) -> dict[str, Any]:
    r = await client.post("/jobs", json=job_body(**changes), headers=t.headers)
    assert r.status_code == 202, r.text
    return r.json()


def count_jobs(db: Any, tenant_name: str | None = None) -> int:
    from app.db.models import Tenant as TenantRow

    q = select(func.count()).select_from(Job)
    if tenant_name is not None:
        q = q.join(TenantRow, TenantRow.id == Job.tenant_id).where(TenantRow.name == tenant_name)
    with db.connect() as conn:
        return int(conn.scalar(q))


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)
async def test_create_get_and_enqueue(
    client: httpx.AsyncClient, tenant: Tenant, queue: Queue
) -> None:
    r = await client.post("/jobs", json=TINY_JOB, headers=tenant.headers)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] == "queued" and job["progress"] == 0 and job["stage"] is None
    assert job["model"] == {"arch": "d4c-tiny-vit", "pretrained": "builtin"}
    assert job["eval_task"] == "object10"
    recipe = Recipe.from_dict(job["recipe"])  # the stored recipe is the engine's, exactly
    assert (recipe.quant.weight_bits, recipe.quant.act_bits) == (4, 8)
    assert recipe.quant.recon_iters == 10 and recipe.calibration.num_images == 8
    assert json.loads(recipe.to_json()) == job["recipe"]
    assert queue.sent == [job["id"]]

    got = await client.get(f"/jobs/{job['id']}", headers=tenant.headers)
    assert got.status_code == 200
    assert got.json() == job
    assert got.json()["created_at"].endswith(("Z", "+00:00"))


async def test_d4c_synth_settings_reach_the_recipe(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    synth = {"components": ["pgsi", "pae"], "iters": 3, "batch": 4, "per_batch_adam": True}
    prompts = {"classnames": ["cat", "dog"], "templates": ["a photo of a {c}."]}
    job = await submit(
        client,
        tenant,
        recipe={
            "quant": {"weight_bits": 6, "act_bits": 6},
            "calibration": {"method": "d4c", "synth": synth, **prompts},
        },
    )
    r = Recipe.from_dict(job["recipe"])
    assert (r.quant.weight_bits, r.quant.act_bits) == (6, 6)
    assert r.calibration.method == "d4c"
    assert r.calibration.synth.iters == 3 and r.calibration.synth.batch == 4
    assert r.calibration.synth.components == ("pgsi", "pae")
    assert r.calibration.synth.per_batch_adam is True
    assert r.calibration.classnames == ("cat", "dog")


async def test_quant_search_sizes_reach_the_stored_recipe(
    client: httpx.AsyncClient, tenant: Tenant
) -> None:
    sizes = {
        "range_init_images": 8,
        "range_init_prompts": 4,
        "mse_max_samples": 16,
        "mse_candidates": 10,
        "recon_batch": 2,
        "text_mlp_bits": 6,
    }
    job = await submit(client, tenant, recipe={"quant": sizes})
    recipe = Recipe.from_dict(job["recipe"])
    assert {k: getattr(recipe.quant, k) for k in sizes} == sizes
    assert json.loads(recipe.to_json()) == job["recipe"]  # still exactly Recipe.to_dict()

    # Omitted fields keep the engine's defaults.
    partial = await submit(client, tenant, recipe={"quant": {"mse_candidates": 7}, "seed": 1})
    default = await submit(client, tenant, recipe={"seed": 2})
    q, d = partial["recipe"]["quant"], default["recipe"]["quant"]
    assert q["mse_candidates"] == 7
    assert {k: v for k, v in q.items() if k != "mse_candidates"} == {
        k: v for k, v in d.items() if k != "mse_candidates"
    }


async def test_quant_limits_come_from_settings(
    client: httpx.AsyncClient, tenant: Tenant, settings: Any
) -> None:
    settings.max_mse_candidates = 5
    body = job_body(recipe={"quant": {"mse_candidates": 6}})
    p = assert_problem(await client.post("/jobs", json=body, headers=tenant.headers), 422)
    assert p["errors"][0]["field"] == "recipe.quant.mse_candidates" and "5" in p["detail"]
    # A lower max_images does not reject the engine's default range-init size (32).
    settings.max_images = 8
    await submit(client, tenant)


def _r(**recipe: Any) -> dict[str, Any]:
    return {"recipe": recipe}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"model": {"arch": "no-such-arch"}}, "model.arch"),
    ({"model": {"arch": "d4c-tiny-vit", "pretrained": "nope"}}, "model.pretrained"),
    ({"model": {"arch": "ViT-B-32", "pretrained": "builtin"}}, "model.pretrained"),
    ({"model": {"arch": "d4c-tiny-vit", "checkpoint_id": "f" * 32}}, "model.checkpoint_id"),
    ({"model": {"arch": "d4c-tiny-vit", "pretrained": "builtin", "checkpoint_id": "x"}}, "model"),
    (_r(quant={"weight_bits": 9}), "recipe.quant.weight_bits"),
    (_r(quant={"weight_bits": 1}), "recipe.quant.weight_bits"),
    (_r(quant={"act_bits": "8"}), "recipe.quant.act_bits"),
    (_r(calibration={"method": "real"}), "recipe.calibration.method"),
    (_r(calibration={"method": "magic"}), "recipe.calibration.method"),
    (_r(calibration={"method": "bns"}), "recipe.calibration.method"),  # ViT: no BatchNorm
    (_r(calibration={"num_images": 5000}), "recipe.calibration.num_images"),
    (_r(calibration={"num_images": 0}), "recipe.calibration.num_images"),
    (_r(quant={"recon_iters": 10**6}), "recipe.quant.recon_iters"),
    (
        _r(calibration={"method": "d4c", "synth": {"iters": 10**6}}),
        "recipe.calibration.synth.iters",
    ),
    (
        _r(calibration={"method": "d4c", "synth": {"components": ["scg"]}}),
        "recipe.calibration.synth.components",
    ),
    (
        _r(calibration={"method": "d4c", "synth": {"components": ["zzz"]}}),
        "recipe.calibration.synth.components.0",
    ),
    (_r(calibration={"synth": {"iters": 5}}), "recipe.calibration.synth"),  # noise: no synthesis
    (_r(calibration={"num_prompts": 10**6}), "recipe.calibration.num_prompts"),
    (
        _r(calibration={"classnames": ["a"], "templates": ["no placeholder"]}),
        "recipe.calibration.templates",
    ),
    ({"eval_task": "imagenet"}, "eval_task"),
    (_r(seed=-1), "recipe.seed"),
    ({"colour": "red"}, "colour"),
    (_r(colour="red"), "recipe.colour"),
    (_r(version=3), "recipe.version"),
    (_r(quant={"range_init_images": 0}), "recipe.quant.range_init_images"),
    (_r(quant={"range_init_images": 5000}), "recipe.quant.range_init_images"),  # > max_images
    (_r(quant={"range_init_prompts": 10**6}), "recipe.quant.range_init_prompts"),
    (_r(quant={"mse_max_samples": 10**6}), "recipe.quant.mse_max_samples"),
    (_r(quant={"mse_candidates": 10**6}), "recipe.quant.mse_candidates"),
    (_r(quant={"recon_batch": 0}), "recipe.quant.recon_batch"),
    (_r(quant={"recon_batch": 5000}), "recipe.quant.recon_batch"),
    (_r(quant={"recon_batch": "8"}), "recipe.quant.recon_batch"),  # strict: no coercion
    (_r(quant={"recon_batch": True}), "recipe.quant.recon_batch"),
    (_r(quant={"text_mlp_bits": 9}), "recipe.quant.text_mlp_bits"),
    (_r(quant={"text_mlp_bits": 1}), "recipe.quant.text_mlp_bits"),
    (_r(quant={"adaround_b_end": 30.0}), "recipe.quant"),  # cross-field: b_end <= b_start
    ({"recipe": {"quant": []}}, "recipe.quant"),
    ({"recipe": "w4a8"}, "recipe"),
]


@pytest.mark.parametrize(("change", "field"), BAD, ids=[f for _, f in BAD])
async def test_validation_names_the_field(
    client: httpx.AsyncClient, tenant: Tenant, queue: Queue, db: Any, change: Any, field: str
) -> None:
    body = job_body(**change)
    r = await client.post("/jobs", json=body, headers=tenant.headers)
    p = assert_problem(r, 422)
    assert field in [e["field"] for e in p["errors"]], p
    assert queue.sent == []
    assert count_jobs(db, tenant.name) == 0


async def test_budget_limits_come_from_settings(
    client: httpx.AsyncClient, tenant: Tenant, settings: Any
) -> None:
    settings.max_images = 4
    p = assert_problem(await client.post("/jobs", json=job_body(), headers=tenant.headers), 422)
    assert p["errors"][0]["field"] == "recipe.calibration.num_images" and "4" in p["detail"]


async def test_list_pagination_and_state_filter(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any, db: Any
) -> None:
    ids = [(await submit(client, tenant, recipe={"seed": i}))["id"] for i in range(5)]
    other = make_tenant()
    await submit(client, other)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await client.get("/jobs", params=params, headers=tenant.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == ids[::-1]  # newest first, nothing repeated or lost, other tenant absent

    set_job(db, ids[1], state="succeeded", progress=1.0)
    set_job(db, ids[3], state="failed")
    r = await client.get("/jobs", params={"state": "succeeded"}, headers=tenant.headers)
    assert [j["id"] for j in r.json()["items"]] == [ids[1]]
    r = await client.get("/jobs", params={"state": "queued"}, headers=tenant.headers)
    assert [j["id"] for j in r.json()["items"]] == [ids[4], ids[2], ids[0]]

    assert_problem(await client.get("/jobs", params={"state": "nope"}, headers=tenant.headers), 422)
    p = assert_problem(
        await client.get("/jobs", params={"cursor": "!!garbage"}, headers=tenant.headers), 422
    )
    assert p["errors"][0]["field"] == "cursor"
    assert_problem(await client.get("/jobs", params={"limit": 0}, headers=tenant.headers), 422)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)
async def test_idempotency(client: httpx.AsyncClient, tenant: Tenant, queue: Queue) -> None:
    h = {**tenant.headers, "Idempotency-Key": "abc-123"}
    first = await client.post("/jobs", json=TINY_JOB, headers=h)
    assert first.status_code == 202
    again = await client.post("/jobs", json=TINY_JOB, headers=h)
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert queue.sent == [first.json()["id"]]  # enqueued once

    p = assert_problem(
        await client.post("/jobs", json=job_body(recipe={"seed": 7}), headers=h), 422
    )
    assert p["errors"][0]["field"] == "Idempotency-Key"

    # Keys are per tenant: another tenant may use the same key for its own job.
    # (and a new key makes a new job)
    fresh = await client.post(
        "/jobs", json=TINY_JOB, headers={**tenant.headers, "Idempotency-Key": "other"}
    )
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]


async def test_idempotency_key_is_per_tenant(
    client: httpx.AsyncClient, tenant: Tenant, make_tenant: Any
) -> None:
    other = make_tenant()
    a = await client.post(
        "/jobs", json=TINY_JOB, headers={**tenant.headers, "Idempotency-Key": "k"}
    )
    b = await client.post("/jobs", json=TINY_JOB, headers={**other.headers, "Idempotency-Key": "k"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"], indirect=True)
async def test_cancel(client: httpx.AsyncClient, tenant: Tenant, db: Any) -> None:
    job = await submit(client, tenant)
    r = await client.post(f"/jobs/{job['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "cancelled" and r.json()["cancel_requested"] is True
    assert r.json()["finished_at"] is not None
    assert_problem(await client.post(f"/jobs/{job['id']}/cancel", headers=tenant.headers), 409)

    running = await submit(client, tenant)
    set_job(db, running["id"], state="running", stage="reconstruction", progress=0.4)
    r = await client.post(f"/jobs/{running['id']}/cancel", headers=tenant.headers)
    assert r.status_code == 200
    assert r.json()["state"] == "running" and r.json()["cancel_requested"] is True

    done = await submit(client, tenant)
    set_job(db, done["id"], state="succeeded", progress=1.0)
    assert_problem(await client.post(f"/jobs/{done['id']}/cancel", headers=tenant.headers), 409)


async def test_active_job_limit_429(
    client: httpx.AsyncClient, tenant: Tenant, settings: Any, db: Any, queue: Queue
) -> None:
    settings.max_active_jobs_per_tenant = 2
    a = await submit(client, tenant)
    await submit(client, tenant)
    r = await client.post("/jobs", json=TINY_JOB, headers=tenant.headers)
    p = assert_problem(r, 429)
    assert int(r.headers["retry-after"]) > 0
    assert "2" in p["detail"]
    assert len(queue.sent) == 2 and count_jobs(db, tenant.name) == 2
    set_job(db, a["id"], state="succeeded")  # finished jobs free a slot
    await submit(client, tenant)


async def test_events_stream_until_the_job_ends(
    client: httpx.AsyncClient, tenant: Tenant, db: Any
) -> None:
    job = await submit(client, tenant)
    set_job(db, job["id"], state="succeeded", stage="export", progress=1.0)
    async with client.stream("GET", f"/jobs/{job['id']}/events", headers=tenant.headers) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join([chunk async for chunk in r.aiter_text()])
    events = [
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("event:")
    ]
    assert events == ["progress", "end"]
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    assert json.loads(data[-1])["state"] == "succeeded"


async def test_problem_shape_and_openapi(client: httpx.AsyncClient, tenant: Tenant) -> None:
    p = assert_problem(await client.get("/jobs/" + "0" * 32, headers=tenant.headers), 404)
    assert p["type"] == "about:blank" and p["instance"] == "/jobs/" + "0" * 32
    p = assert_problem(
        await client.post("/jobs", content=b"{not json", headers=tenant.headers), 422
    )
    assert p["type"].endswith("/validation")
    spec = (await client.get("/openapi.json")).json()
    assert "ProblemDetail" in spec["components"]["schemas"]
    resp = spec["paths"]["/jobs"]["post"]["responses"]
    for status in ("401", "422", "429"):
        assert "application/problem+json" in resp[status]["content"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
