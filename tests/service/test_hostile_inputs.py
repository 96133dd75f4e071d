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
    Case("huge-int", "POST", "/jobs", 422, json_body=_job(seed=10**400)),
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
            prompts={
                "classnames": [f"c{i}" for i in range(2001)],
                "templates": ["a photo of a {c}."],
            }
        ),
    ),
    Case(
        "prompts-over-body-cap",
        "POST",
        "/jobs",
        413,
        json_body=_job(prompts={"classnames": ["x" * 100] * 20_000, "templates": []}),
    ),
    Case(
        "num-prompts-huge",
        "POST",
        "/jobs",
        422,
        json_body=_job(calibration={"method": "noise", "num_prompts": 10**9}),
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
        json_body=_job(prompts={"classnames": ["cat\u0000"], "templates": ["a {c}."]}),
    ),
    Case(
        "template-escape",
        "POST",
        "/jobs",
        422,
        json_body=_job(prompts={"classnames": ["cat"], "templates": ["\x1b[31m{c}"]}),
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
    assert "Traceback" not in r.text
    assert _row_counts(db) == rows_before
    assert _files(settings.data_dir) == files_before
