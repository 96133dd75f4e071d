"""200 concurrent ``POST /jobs`` from a separate process against the real API and workers.

Every request must be answered 202 or 429 with ``Retry-After`` (never a 5xx or a dropped
connection), each tenant's active-job limit must hold under the race, and every accepted job
must reach a terminal state exactly once: no lost job, no extra row, no job run twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.cli import create_key
from app.db.models import Job
from app.db.session import sync_sessionmaker
from tests.support.jobs import FINISHED, job_body
from tests.support.procs import wait_for
from tests.support.stack import ServiceStack

BURST = Path(__file__).resolve().parents[2] / "bench" / "post_burst.py"
REQUESTS = 200
TENANTS = 4
LIMIT = 5  # active jobs per tenant


def _burst(stack: ServiceStack, keys: list[str], body: dict[str, Any], n: int, tmp: Path) -> Any:
    """Run ``bench/post_burst.py`` (a separate process) against the stack's API."""
    (tmp / "keys").write_text("\n".join(keys))
    (tmp / "body.json").write_text(json.dumps(body))
    done = subprocess.run(
        [
            *(sys.executable, str(BURST), "--url", str(stack.http.base_url)),
            *("--keys-file", str(tmp / "keys"), "--body-file", str(tmp / "body.json")),
            *("--requests", str(n)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout, done.stderr
    result = json.loads(done.stdout)
    assert result["unexpected"] == [], result["unexpected"][:5]
    assert done.returncode == 0
    return result


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_quota_holds_under_a_20_way_race(
    database: str,
    make_stack: Callable[..., ServiceStack],
    request: pytest.FixtureRequest,
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    """20 parallel submits from one tenant with the limit at 4 accept exactly 4, on the
    embedded default (SQLite, filesystem broker, in-process worker) and on PostgreSQL.

    The jobs are long (they stay queued or running for the whole burst), so no accepted job
    can finish and free a slot mid-race: anything over 4 is the race letting one through.
    """
    if database == "sqlite":
        stack = make_stack(None, None, D4C_MAX_ACTIVE_JOBS_PER_TENANT="4")
    else:  # no worker: the jobs stay queued
        pg_url, broker = (request.getfixturevalue(f) for f in ("private_pg_url", "broker_url"))
        stack = make_stack(pg_url, broker, D4C_MAX_ACTIVE_JOBS_PER_TENANT="4")
    stack.start_api()
    key = create_key("race", stack.settings)
    result = _burst(stack, [key], job_body(recon_iters=20000), 20, tmp_path)
    record(
        f"20-way POST /jobs race ({database}, limit 4)",
        "accepted",
        result["statuses"].get("202", 0),
        "jobs",
    )
    assert result["statuses"] == {"202": 4, "429": 16}, result["statuses"]
    sessions = sync_sessionmaker(stack.settings)
    with sessions() as db:
        assert len(db.scalars(select(Job)).all()) == 4


def test_200_concurrent_posts_lose_nothing_and_run_nothing_twice(
    make_stack: Callable[..., ServiceStack],
    private_pg_url: str,
    broker_url: str,
    record: Callable[..., None],
    tmp_path: Path,
) -> None:
    stack = make_stack(private_pg_url, broker_url, D4C_MAX_ACTIVE_JOBS_PER_TENANT=str(LIMIT))
    stack.start_api()
    stack.start_worker()
    stack.start_worker()
    keys = [create_key(f"burst-{i}", stack.settings) for i in range(TENANTS)]
    result = _burst(stack, keys, job_body(recon_iters=2), REQUESTS, tmp_path)
    t_burst = time.monotonic()
    statuses = result["statuses"]
    assert set(statuses) <= {"202", "429"} and sum(statuses.values()) == REQUESTS
    record("200 concurrent POST /jobs", "throughput", result["throughput_rps"], "req/s")
    record("200 concurrent POST /jobs", "p99 latency", result["latency_ms"]["p99"], "ms")
    record("200 concurrent POST /jobs", "accepted (202)", statuses.get("202", 0), "jobs")

    # The limit held under the race: no tenant got more than LIMIT accepted before any of
    # its jobs could finish, and each got its LIMIT (the burst is over long before that).
    accepted = result["accepted"]
    ids = [job_id for per_key in accepted.values() for job_id in per_key]
    assert len(ids) == len(set(ids)) == statuses["202"]
    assert sorted(len(v) for v in accepted.values()) == [LIMIT] * TENANTS, accepted

    # None lost, none extra: the DB holds exactly the accepted jobs.
    sessions = sync_sessionmaker(stack.settings)

    def all_finished() -> list[Job] | None:
        with sessions() as db:
            jobs = db.scalars(select(Job)).all()
        return list(jobs) if all(j.state in FINISHED for j in jobs) else None

    jobs = wait_for(all_finished, 600, "every accepted job to finish", every=1.0)
    record(
        "200 concurrent POST /jobs",
        "burst → every accepted job finished",
        time.monotonic() - t_burst,
    )
    assert sorted(j.id for j in jobs) == sorted(ids)
    for job in jobs:
        assert (job.state, job.attempts) == ("succeeded", 1), (job.id, job.state, job.error)
        assert stack.finished_runs(job.id) == ["succeeded"]  # run once, by one worker
    assert sorted(stack.published()) == sorted(ids) and stack.staging_leftovers() == []
