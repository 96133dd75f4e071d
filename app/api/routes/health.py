"""Liveness and readiness probes."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request
from sqlalchemy import text

from app.api.problems import Problem, problem_responses
from app.schemas import Health, Readiness

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="The job database and the broker are reachable",
    responses=problem_responses(503),
)
async def readyz(request: Request) -> Readiness:
    db = "ok"
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            async with request.app.state.sessionmaker() as session:
                await session.execute(text("SELECT 1"))
    except Exception as e:  # any failure means "not ready"; the reason goes to the body
        db = f"unreachable ({type(e).__name__})"
    broker = "ok"
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            ok = await anyio.to_thread.run_sync(
                request.app.state.broker_ping, abandon_on_cancel=True
            )
        if ok is False:
            broker = "unreachable"
    except Exception as e:
        broker = f"unreachable ({type(e).__name__})"
    if db != "ok" or broker != "ok":
        raise Problem(
            503,
            "Service Unavailable",
            f"database: {db}; broker: {broker}",
            type_="not-ready",
            headers={"Retry-After": "5"},
        )
    return Readiness(database=db, broker=broker)
