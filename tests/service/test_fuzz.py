"""Schemathesis against the app's own OpenAPI schema: every operation, authenticated.

Why: hand-written tests only send the bodies their author thought of. Here each operation of
the live schema (``/openapi.json`` served by the real app, in-process over ASGI, on the
session's PostgreSQL database) gets generated requests, schema-valid and schema-violating,
and every response goes through all of schemathesis's checks: no 5xx, status codes, content
types, headers and bodies as documented, invalid input rejected. The enqueue hook records ids
instead of reaching a broker. Counts and time are bounded so the run stays a unit test.

Run alone: ``HF_HUB_OFFLINE=1 pytest tests/service/test_fuzz.py -q``; summary in
bench/results/fuzz.md.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402
from schemathesis.core.failures import Failure, FailureGroup  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.main import create_app  # noqa: E402
from tests.service.conftest import Queue, Tenant  # noqa: E402

# Examples per (operation, mode). Operations with a small input space (no parameters) run out
# of distinct examples long before this; the total is asserted below.
MAX_EXAMPLES = 60
MIN_REQUESTS = 1000
TIME_BUDGET_S = 150.0
# Operations whose acceptance depends on more than the schema can say: an arch must be in
# open_clip's registry and its tower must suit the method, an upload must be a safetensors
# file of that arch, a cursor must be one the server issued. Schema-valid data may get a 422
# naming the field there; any other rejection (400, 415, ...) still fails the run.
SEMANTIC_422 = {"POST /jobs", "POST /models", "GET /jobs"}
ALLOWED_POSITIVE = {401, 404, 409, 413, 422, 429}


@dataclass
class Tally:
    """What the run sent and what it found, across all operations and modes."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    by_label: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # one per (operation, check)


@dataclass
class Target:
    schema: Any
    tenant: Tenant
    job_id: str  # a finished job of the tenant's, so path-parameter operations get past 404


def _finished_job(settings: Settings, tenant_name: str) -> str:
    """A succeeded job row owned by ``tenant_name`` (inserted directly: no worker runs here)."""
    from sqlalchemy import select

    from app.db.models import Job
    from app.db.models import Tenant as TenantRow
    from app.db.session import sync_sessionmaker
    from tests.support.jobs import tiny_recipe

    with sync_sessionmaker(settings)() as db, db.begin():
        tenant_id = db.scalar(select(TenantRow.id).where(TenantRow.name == tenant_name))
        job = Job(
            tenant_id=tenant_id,
            model={"arch": "d4c-tiny-vit", "pretrained": "builtin"},
            recipe=tiny_recipe(),
            request_hash="0" * 64,
            state="succeeded",
            progress=1.0,
        )
        db.add(job)
        db.flush()
        return job.id


def _valid_model(case: Any) -> Any:
    """Swap in a real model so generated job bodies reach the engine's deeper validation
    (methods, budgets, prompts) instead of all stopping at an unknown arch."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), dict):
        case.body["model"] = {"arch": "d4c-tiny-vit", "pretrained": "builtin"}
    return case


@pytest.fixture
def target(settings: Settings, queue: Queue, make_tenant: Callable[[], Tenant]) -> Iterator[Target]:
    """The live schema of a real app, with schemathesis holding a real tenant's key (so it
    knows which requests are authenticated, and its auth checks can drop the key)."""
    tenant = make_tenant()
    app = create_app(settings, enqueue=queue, broker_ping=lambda: True, queue_depth=lambda: 0)
    config = schemathesis.Config.from_dict(
        {"auth": {"openapi": {"HTTPBearer": {"bearer": tenant.key}}}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    yield Target(schema, tenant, _finished_job(settings, tenant.name))
    from schemathesis.python import asgi

    asgi.shutdown_lifespans()


def _run_operation(
    operation: Any,
    mode: Any,
    tally: Tally,
    deadline: float,
    job_id: str | None = None,
) -> None:
    """Up to MAX_EXAMPLES cases of one operation; with ``job_id``, anchored on a real job
    (path parameter fixed, or a valid model for ``POST /jobs``)."""
    anchored = job_id is not None
    label = f"{operation.label} [{mode.value}{', anchored' if anchored else ''}]"
    if anchored and "{job_id}" in operation.path:
        strategy = operation.as_strategy(generation_mode=mode, path_parameters={"job_id": job_id})
    else:
        strategy = operation.as_strategy(generation_mode=mode)
        if anchored:
            strategy = strategy.map(_valid_model)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        if time.monotonic() > deadline:
            return
        semantic = operation.label in SEMANTIC_422
        excluded = [positive_data_acceptance] if semantic else []
        try:
            response = case.call_and_validate(excluded_checks=excluded)
        except (Failure, FailureGroup) as e:
            found = e.exceptions if isinstance(e, FailureGroup) else (e,)
            for failure in found:
                key = f"{label}: {failure.title}"
                tally.failures.setdefault(key, f"{failure}\n{case.as_curl_command()}"[:3000])
            tally.requests[label] += 1
            return
        tally.requests[label] += 1
        tally.statuses[response.status_code] += 1
        tally.by_label[(label, response.status_code)] += 1
        if semantic and mode is schemathesis.GenerationMode.POSITIVE:
            code = response.status_code
            if code >= 400 and code not in ALLOWED_POSITIVE:
                key = f"{label}: schema-valid request got {code}"
                tally.failures.setdefault(key, f"{response.text[:500]}\n{case.as_curl_command()}")

    with contextlib.suppress(Unsatisfiable):  # an operation with too few distinct inputs
        run()


def test_schemathesis_finds_no_5xx_and_no_schema_violations(target: Target) -> None:
    tally = Tally()
    start = time.monotonic()
    deadline = start + TIME_BUDGET_S
    operations = [r.ok() for r in target.schema.get_all_operations()]
    # DELETEs last: deleting the anchored job turns its artifact routes into 410s (as
    # documented) that would fail the other operations' "valid data is accepted" check.
    operations.sort(key=lambda op: op.method.upper() == "DELETE")
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _run_operation(operation, mode, tally, deadline)
        if "{job_id}" in operation.path or operation.label == "POST /jobs":
            mode = schemathesis.GenerationMode.POSITIVE
            _run_operation(operation, mode, tally, deadline, target.job_id)
    duration = time.monotonic() - start
    total = sum(tally.requests.values())
    print(
        f"\nschemathesis {schemathesis.__version__}: {total} requests, "
        f"{len(operations)} operations, {duration:.1f} s, statuses {dict(tally.statuses)}"
    )
    for label, n in sorted(tally.requests.items()):
        codes = {c: k for (lb, c), k in sorted(tally.by_label.items()) if lb == label}
        print(f"  {n:5d}  {label}  {codes}")
    for key, text in tally.failures.items():
        print(f"--- {key}\n{text}")
    assert not tally.failures, list(tally.failures)
    assert not any(s >= 500 for s in tally.statuses)
    assert total >= MIN_REQUESTS
    assert {op.label for op in operations} <= {k.rsplit(" [", 1)[0] for k in tally.requests}
