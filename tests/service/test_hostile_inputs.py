"""Hostile input, table-driven: each request gets its intended 4xx and changes nothing.

Why: the fuzz test explores the schema; these are the inputs an attacker or a broken client
actually sends (bodies too big or not JSON, pickles and compression bombs as checkpoints,
path traversal in artifact names, forged keys, other tenants' ids). For each the answer must be
the documented problem+json status, and the database (row count of every table) and the data
directory (every file, with its size) must be exactly as before: a rejected request may not
leave a row, a temp file or a half-written checkpoint behind.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.core.config import Settings
from app.db.base import Base
from tests.service.conftest import TINY_JOB, Tenant

pytestmark = pytest.mark.anyio

UPLOAD_CAP = 1_000_000  # max_upload_bytes for this module: a real cap, small enough to exceed
JSON = {"Content-Type": "application/json"}
OCTET = {"Content-Type": "application/octet-stream"}


@dataclass
class Case:
    """One hostile request. ``path`` may use {own} / {other} (job ids); ``auth`` is "own",
    "none" or a literal Authorization header value."""

    id: str
    method: str
    path: str
    status: int | tuple[int, ...]  # several where the decoded path may miss every route (404)
    content: bytes | None = None
    json_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    auth: str = "own"
    stream: bool = False  # send the body chunked, without Content-Length


def _job(**changes: Any) -> dict[str, Any]:
    return {**TINY_JOB, **changes}


def _pickle_bomb() -> bytes:
    """A pickle whose loading would run a command: it must never be unpickled."""

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("unpickled!",))

    return pickle.dumps({"state_dict": Exploit()})


def _zip_bomb() -> bytes:
    """torch.save's container format (zip) holding 50 MB of zeros in ~50 KB."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", b"\0" * 50_000_000)
    return buf.getvalue()


def _safetensors_huge_header() -> bytes:
    """A safetensors prefix claiming a 2**62-byte header: must not be allocated."""
    return struct.pack("<Q", 2**62) + b'{"a":' + b" " * 100


def _safetensors_lying_offsets() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4]}})
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * 4


TRAVERSAL = [
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%252F..%252Fetc%252Fpasswd",
    "%2Fetc%2Fpasswd",
    "model.safetensors%00.txt",
    "manifest.json%2F..%2F..%2F..%2Fd4c.db",
    "..%5C..%5Cwindows%5Cwin.ini",
    "%00",
]

# An encoded slash decodes into the path and misses every route (404); other malformed ids and
# names are refused by their pattern (422) or are not an artifact name (404).
TRAVERSAL_STATUS = (404, 422)

CASES: list[Case] = [
    # --- bodies that are not (acceptable) JSON
    Case("malformed-json", "POST", "/jobs", 422, content=b"{not json", headers=JSON),
    Case("truncated-json", "POST", "/jobs", 422, content=b'{"model": {"arch": ', headers=JSON),
    Case("not-utf8", "POST", "/jobs", 422, content=b"\xff\xfe{}", headers=JSON),
    Case("json-array", "POST", "/jobs", 422, json_body=[TINY_JOB]),
    Case("json-null", "POST", "/jobs", 422, json_body=None, content=b"null", headers=JSON),
    Case("deep-nesting", "POST", "/jobs", 422, content=b"[" * 100_000, headers=JSON),
    Case("nan", "POST", "/jobs", 422, content=b'{"seed": NaN}', headers=JSON),
    Case("huge-int", "POST", "/jobs", 422, json_body=_job(recipe={"seed": 10**400})),
    Case("oversized-json", "POST", "/jobs", 413, content=b" " * 2_000_000, headers=JSON),
    Case(
        "oversized-json-chunked",
        "POST",
        "/jobs",
        413,
        content=b" " * 2_000_000,
        headers=JSON,
        stream=True,
    ),
    Case("oversized-cancel-body", "POST", "/jobs/{own}/cancel", 413, content=b"x" * 2_000_000),
    # --- wrong content types
    Case(
        "text-plain",
        "POST",
        "/jobs",
        422,
        content=json.dumps(TINY_JOB).encode(),
        headers={"Content-Type": "text/plain"},
    ),
    Case(
        "form-encoded",
        "POST",
        "/jobs",
        422,
        content=b"model=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Case(
        "upload-multipart",
        "POST",
        "/models?arch=d4c-tiny-vit",
        415,
        content=b"--b\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    ),
    Case("upload-json", "POST", "/models?arch=d4c-tiny-vit", 415, json_body={"a": 1}),
    # --- huge prompt lists
    Case(
        "prompts-over-budget",
        "POST",
        "/jobs",
        422,
        json_body=_job(
            recipe={
                "calibration": {
                    "classnames": [f"c{i}" for i in range(2001)],
                    "templates": ["a photo of a {c}."],
                }
            }
        ),
    ),
    Case(
        "prompts-over-body-cap",
        "POST",
        "/jobs",
        413,
        json_body=_job(recipe={"calibration": {"classnames": ["x" * 100] * 20_000}}),
    ),
    Case(
        "num-prompts-huge",
        "POST",
        "/jobs",
        422,
        json_body=_job(recipe={"calibration": {"method": "noise", "num_prompts": 10**9}}),
    ),
    # --- unicode and control characters in names
    Case("arch-nul", "POST", "/jobs", 422, json_body=_job(model={"arch": "d4c-tiny-vit\0"})),
    Case("arch-newline", "POST", "/jobs", 422, json_body=_job(model={"arch": "d4c\n-tiny-vit"})),
    Case("arch-rtl", "POST", "/jobs", 422, json_body=_job(model={"arch": "\u202etiv-ynit-c4d"})),
    Case("arch-traversal", "POST", "/jobs", 422, json_body=_job(model={"arch": "../../etc"})),
    Case(
        "arch-emoji",
        "POST",
        "/jobs",
        422,
        json_body=_job(model={"arch": "🦜" * 50, "pretrained": "builtin"}),
    ),
    Case(
        "pretrained-path",
        "POST",
        "/jobs",
        422,
        json_body=_job(model={"arch": "d4c-tiny-vit", "pretrained": "/etc/passwd"}),
    ),
    Case("eval-task-control", "POST", "/jobs", 422, json_body=_job(eval_task="object10\x1b[2J")),
    Case(
        "template-lone-surrogate",
        "POST",
        "/jobs",
        422,
        content=b'{"model": {"arch": "\\ud800"}}',
        headers=JSON,
    ),
    Case("upload-arch-nul", "POST", "/models?arch=d4c%00", 422, content=b"x", headers=OCTET),
    # --- dangerous uploads (raw body; all must be rejected without unpickling or inflating)
    Case(
        "upload-pickle",
        "POST",
        "/models?arch=d4c-tiny-vit",
        422,
        content=_pickle_bomb(),
        headers=OCTET,
    ),
    Case(
        "upload-zip-bomb",
        "POST",
        "/models?arch=d4c-tiny-vit",
        422,
        content=_zip_bomb(),
        headers=OCTET,
    ),
    Case(
        "upload-huge-header",
        "POST",
        "/models?arch=d4c-tiny-vit",
        422,
        content=_safetensors_huge_header(),
        headers=OCTET,
    ),
    Case(
        "upload-lying-offsets",
        "POST",
        "/models?arch=d4c-tiny-vit",
        422,
        content=_safetensors_lying_offsets(),
        headers=OCTET,
    ),
    Case("upload-empty", "POST", "/models?arch=d4c-tiny-vit", 422, content=b"", headers=OCTET),
    Case(
        "upload-over-cap",
        "POST",
        "/models?arch=d4c-tiny-vit",
        413,
        content=b"\0" * (UPLOAD_CAP + 1),
        headers=OCTET,
    ),
    Case(
        "upload-over-cap-chunked",
        "POST",
        "/models?arch=d4c-tiny-vit",
        413,
        content=b"\0" * (UPLOAD_CAP + 1),
        headers=OCTET,
        stream=True,
    ),
    # --- path traversal (artifact names, job and checkpoint ids)
    *[
        Case(f"artifact-{i}", "GET", f"/jobs/{{own}}/artifacts/{t}", TRAVERSAL_STATUS)
        for i, t in enumerate(TRAVERSAL)
    ],
    *[
        Case(f"job-id-{i}", "GET", f"/jobs/{t}/artifacts/model.safetensors", TRAVERSAL_STATUS)
        for i, t in enumerate(TRAVERSAL[:4])
    ],
    *[
        Case(f"checkpoint-id-{i}", "GET", f"/models/{t}", TRAVERSAL_STATUS)
        for i, t in enumerate(TRAVERSAL)
    ],
    Case("job-id-nul", "GET", "/jobs/%00", 422),
    Case("job-id-nul-cancel", "POST", "/jobs/abc%00def/cancel", 422),
    Case(
        "checkpoint-id-nul-in-body",
        "POST",
        "/jobs",
        422,
        json_body=_job(model={"arch": "d4c-tiny-vit", "checkpoint_id": "ab\u0000cd"}),
    ),
    Case(
        "classname-nul",
        "POST",
        "/jobs",
        422,
        json_body=_job(recipe={"calibration": {"classnames": ["cat\u0000"]}}),
    ),
    Case(
        "template-escape",
        "POST",
        "/jobs",
        422,
        json_body=_job(recipe={"calibration": {"templates": ["\x1b[31m{c}"]}}),
    ),
    Case(
        "checkpoint-id-traversal-in-body",
        "POST",
        "/jobs",
        422,
        json_body=_job(model={"arch": "d4c-tiny-vit", "checkpoint_id": "../../etc/passwd"}),
    ),
    # --- forged, missing, malformed keys
    Case("no-key", "GET", "/jobs", 401, auth="none"),
    Case("empty-bearer", "GET", "/jobs", 401, auth="Bearer "),
    Case("forged-key", "GET", "/jobs", 401, auth="Bearer d4c_" + "0" * 40),
    Case("basic-auth", "GET", "/jobs", 401, auth="Basic dXNlcjpwYXNz"),
    Case("huge-key", "GET", "/jobs", 401, auth="Bearer " + "k" * 8000),
    Case("key-with-spaces", "GET", "/jobs", 401, auth="Bearer a b c"),
    Case("forged-key-submit", "POST", "/jobs", 401, json_body=TINY_JOB, auth="Bearer forged"),
    Case(
        "forged-key-upload",
        "POST",
        "/models?arch=d4c-tiny-vit",
        401,
        content=b"\0" * 64,
        headers=OCTET,
        auth="Bearer forged",
    ),
    Case("no-key-cancel", "POST", "/jobs/{own}/cancel", 401, auth="none"),
    # --- other tenants' ids: indistinguishable from missing ones
    Case("other-job", "GET", "/jobs/{other}", 404),
    Case("other-job-cancel", "POST", "/jobs/{other}/cancel", 404),
    Case("other-job-events", "GET", "/jobs/{other}/events", 404),
    Case("other-job-artifacts", "GET", "/jobs/{other}/artifacts", 404),
    Case("other-job-download", "GET", "/jobs/{other}/artifacts/model.safetensors", 404),
    # --- query and header abuse
    Case("limit-huge", "GET", "/jobs?limit=" + "9" * 400, 422),
    Case("cursor-garbage", "GET", "/jobs?cursor=%00%ff", 422),
    Case("state-bogus", "GET", "/jobs?state=../../", 422),
    Case(
        "idempotency-key-too-long",
        "POST",
        "/jobs",
        422,
        json_body=TINY_JOB,
        headers={"Idempotency-Key": "k" * 300},
    ),
    # --- loose coercion: a number is a JSON number, a flag a JSON boolean
    *[
        Case(f"strict-{name}", "POST", "/jobs", 422, json_body=_job(recipe=recipe))
        for name, recipe in {
            "num-images-bool": {"calibration": {"method": "noise", "num_images": True}},
            "recon-iters-string": {"quant": {"recon_iters": "10"}},
            "recon-iters-float": {"quant": {"recon_iters": 10.0}},
            "weight-bits-string": {"quant": {"weight_bits": "4"}},
            "seed-string": {"seed": "1"},
            "per-batch-adam-int": {
                "calibration": {"method": "d4c", "synth": {"per_batch_adam": 1}}
            },
            "classname-number": {"calibration": {"classnames": [1]}},
        }.items()
    ],
    # --- prompts that display as something other than what the model reads
    *[
        Case(
            f"prompt-{name}",
            "POST",
            "/jobs",
            422,
            json_body=_job(recipe={"calibration": {"classnames": [text]}}),
        )
        for name, text in {
            "c1-nel": "cat\x85dog",
            "c1-csi": "cat\x9b31m",
            "bidi-override": "cat\u202edog",
            "bidi-embedding": "\u202acat",
            "bidi-isolate": "cat\u2066dog\u2069",
        }.items()
    ],
    # --- no redirect to a client-chosen Host, before or after auth: a plain 404
    Case("trailing-slash", "GET", "/jobs/", 404, auth="none", headers={"Host": "evil.example"}),
    Case("trailing-slash-auth", "POST", "/jobs/", 404, json_body=TINY_JOB),
]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    settings.max_upload_bytes = UPLOAD_CAP
    return settings


@dataclass
class World:
    client: httpx.AsyncClient
    own: Tenant
    own_job: str
    other_job: str


@pytest.fixture
async def world(client: httpx.AsyncClient, make_tenant: Callable[[], Tenant]) -> World:
    """Two tenants with one job each (submitted through the API), before any snapshot."""
    own, other = make_tenant(), make_tenant()
    jobs = []
    for t in (own, other):
        r = await client.post("/jobs", json=TINY_JOB, headers=t.headers)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    return World(client, own, jobs[0], jobs[1])


def _row_counts(db: Any) -> dict[str, int]:
    with db.connect() as conn:
        return {
            t.name: int(conn.scalar(select(func.count()).select_from(t)))
            for t in Base.metadata.sorted_tables
        }


def _files(root: Path) -> dict[str, int]:
    """Every file under the data dir with its size (directories alone are not state)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


async def _chunks(data: bytes, size: int = 65536) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_hostile_input_is_refused_and_changes_nothing(
    world: World, settings: Settings, db: Any, case: Case
) -> None:
    rows_before, files_before = _row_counts(db), _files(settings.data_dir)
    headers = dict(case.headers)
    if case.auth == "own":
        headers |= world.own.headers
    elif case.auth != "none":
        headers["Authorization"] = case.auth
    url = case.path.format(own=world.own_job, other=world.other_job)
    kwargs: dict[str, Any] = {"headers": headers}
    if case.content is not None:
        kwargs["content"] = _chunks(case.content) if case.stream else case.content
    elif case.json_body is not None:
        kwargs["json"] = case.json_body
    r = await world.client.request(case.method, httpx.URL(url), **kwargs)

    allowed = case.status if isinstance(case.status, tuple) else (case.status,)
    assert r.status_code in allowed, r.text[:500]
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    problem = r.json()
    assert problem["status"] == r.status_code and problem["title"]
    assert "Traceback" not in r.text and "location" not in r.headers
    # Never a server path (the upload's temp file, the data dir) in an answer.
    assert ".part" not in r.text and str(settings.data_dir) not in r.text
    assert _row_counts(db) == rows_before
    assert _files(settings.data_dir) == files_before


async def test_405_allow_lists_every_method_the_path_serves(world: World) -> None:
    """``/jobs`` is two routes (GET, POST): a 405 must not advertise only the first."""
    r = await world.client.put("/jobs", headers=world.own.headers)
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}
    r = await world.client.patch(f"/jobs/{world.own_job}", headers=world.own.headers)
    allow = r.headers["allow"]
    assert r.status_code == 405 and "GET" in allow and "PATCH" not in allow


async def test_idempotency_key_errors_name_the_header_and_match_the_document(
    world: World,
) -> None:
    h = world.own.headers
    r = await world.client.post("/jobs", json=TINY_JOB, headers=h | {"Idempotency-Key": ""})
    assert r.status_code == 422 and [e["field"] for e in r.json()["errors"]] == ["Idempotency-Key"]
    r = await world.client.post("/jobs", json=TINY_JOB, headers=h | {"Idempotency-Key": "k1"})
    assert r.status_code == 202
    other = _job(recipe={"seed": 1})
    r = await world.client.post("/jobs", json=other, headers=h | {"Idempotency-Key": "k1"})
    problem = r.json()
    assert r.status_code == 422, problem
    assert problem["type"].endswith("/idempotency-key-reused")
    assert [e["field"] for e in problem["errors"]] == ["Idempotency-Key"]
    # The document says what the behaviour is: 422 for a reused key, 409 for a concurrent one.
    doc = (await world.client.get("/openapi.json")).json()
    responses = doc["paths"]["/jobs"]["post"]["responses"]
    assert "Idempotency-Key reused" in responses["422"]["description"]
    assert "Idempotency-Key" in responses["409"]["description"]
    assert "application/problem+json" in responses["422"]["content"]


async def test_unobtainable_pretrained_tag_is_refused_at_submit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline and not in the hub cache: the job could only fail in the worker."""
    import d4c_core.models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(d4c_core.models, "_cached_locally", lambda cfg: False)
    body = _job(model={"arch": "RN50", "pretrained": "openai"})
    r = await world.client.post("/jobs", json=body, headers=world.own.headers)
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "model.pretrained" and "checkpoint" in error["message"]
    # Weights in the local cache: the same body is accepted (the worker's check still runs).
    monkeypatch.setattr(d4c_core.models, "_cached_locally", lambda cfg: True)
    r = await world.client.post("/jobs", json=body, headers=world.own.headers)
    assert r.status_code == 202, r.text


async def test_upload_cut_off_by_the_client_is_no_server_error(
    world: World, settings: Settings, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A client hanging up mid-upload: files and rows cleaned up, no ERROR, no 5xx."""
    import logging

    rows_before, files_before = _row_counts(db), _files(settings.data_dir)
    messages = [{"type": "http.request", "body": b"\0" * 70_000, "more_body": True}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/models",
        "raw_path": b"/models",
        "root_path": "",
        "query_string": b"arch=d4c-tiny-vit",
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/octet-stream"),
            (b"authorization", world.own.headers["Authorization"].encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
    }
    with caplog.at_level(logging.INFO):
        await world.client.app(scope, receive, send)  # type: ignore[attr-defined]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    statuses = [getattr(r, "status", None) for r in caplog.records if r.name == "d4c.access"]
    assert statuses and all(s is not None and s < 500 for s in statuses), statuses
    assert sent[0]["status"] == 400
    assert _row_counts(db) == rows_before
    assert _files(settings.data_dir) == files_before


# --- issue 13, item 3: weights that are not floats or not finite, and models that overflow.
# Imports are local to keep this block self-contained (other blocks append to this module).

BAD_TENSOR = "visual.proj"


def _tiny_vit_state() -> dict[str, Any]:
    """The built-in tiny ViT's weights in float32 (shipped as fp16)."""
    from d4c_core.models import WEIGHTS_DIR, read_checkpoint

    builtin = read_checkpoint(WEIGHTS_DIR / "d4c-tiny-vit.safetensors")
    return {k: v.float() for k, v in builtin.items()}


def _bad_weights(kind: str) -> bytes:
    import torch
    from safetensors.torch import save

    state = _tiny_vit_state()
    t = state[BAD_TENSOR]
    state[BAD_TENSOR] = {
        "int8": lambda: t.to(torch.int8),
        "bool": lambda: t > 0,
        "int64": lambda: t.to(torch.int64),
        "nan": lambda: torch.full_like(t, float("nan")),
        "inf": lambda: t.clone().index_fill_(0, torch.tensor([1]), float("inf")),
    }[kind]().contiguous()
    return save(state)


@pytest.mark.parametrize("kind", ["int8", "bool", "int64", "nan", "inf"])
async def test_upload_refuses_non_float_or_non_finite_weights_naming_the_tensor(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings, db: Any, kind: str
) -> None:
    """The right names and shapes are not enough: an int8 / bool / int64 tensor loaded by
    silent casting (a job on it "succeeded"), an all-NaN one failed minutes later as an
    internal error. 422 at upload, naming the tensor, never the server's temp path."""
    settings.max_upload_bytes = 64_000_000  # the tiny ViT is 15 MB; this module caps at 1 MB
    rows_before, files_before = _row_counts(db), _files(settings.data_dir)
    r = await client.post(
        "/models?arch=d4c-tiny-vit", content=_bad_weights(kind), headers=tenant.headers | OCTET
    )
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["errors"][0]["field"] == "body"
    message = problem["errors"][0]["message"]
    assert BAD_TENSOR in message
    assert ("floating point" if kind.startswith(("int", "bool")) else "NaN or Inf") in message
    assert ".upload-" not in r.text and str(settings.data_dir) not in r.text
    assert _row_counts(db) == rows_before
    assert _files(settings.data_dir) == files_before


async def test_a_model_that_overflows_fails_as_non_finite_not_as_internal_error(
    client: httpx.AsyncClient, tenant: Tenant, settings: Settings
) -> None:
    """Finite weights (the upload is accepted) whose activations overflow float32: the job
    fails as a client problem with its own type and title, not ``/problems/internal-error``
    (nor "succeeded" with NaN metrics)."""
    import anyio
    import torch
    from safetensors.torch import save

    from worker.tasks import JobRunner

    settings.max_upload_bytes = 64_000_000
    state = _tiny_vit_state()
    state["visual.conv1.weight"] = torch.full_like(state["visual.conv1.weight"], 1e38)
    r = await client.post(
        "/models?arch=d4c-tiny-vit", content=save(state), headers=tenant.headers | OCTET
    )
    assert r.status_code == 201, r.text
    job = {
        "model": {"arch": "d4c-tiny-vit", "checkpoint_id": r.json()["checkpoint_id"]},
        "recipe": {"quant": {"recon_iters": 2}, "calibration": {"num_images": 8}},
    }
    r = await client.post("/jobs", json=job, headers=tenant.headers)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    runner = JobRunner(settings, "w-hostile")
    assert await anyio.to_thread.run_sync(runner.run, job_id) == "failed"
    body = (await client.get(f"/jobs/{job_id}", headers=tenant.headers)).json()
    assert body["state"] == "failed", body
    error = body["error"]
    assert error["type"] == "/problems/non-finite", error
    assert error["status"] == 422 and error["title"] == "The model produced non-finite values"
    assert "non-finite" in error["detail"] and str(settings.data_dir) not in error["detail"]
