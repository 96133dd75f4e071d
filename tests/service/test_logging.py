"""Logs are JSON lines, and every line logged while a job's task runs carries its ``job_id``,
whichever logger wrote it (the engine's, a library's), through the real Celery task path."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from app.core.logging import configure_logging, job_context
from worker.logs import job_log


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``configure_logging`` as the services call it, its stderr swapped for a buffer;
    returns a reader of the JSON lines."""
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]

    yield lines
    root.handlers[:], level = saved
    root.setLevel(level)


def test_job_context_stamps_every_logger(json_logs: Any) -> None:
    logging.getLogger("d4c.api").info("before")
    with job_context("job-abc"):
        logging.getLogger("d4c.pipeline").info("unit done", extra={"unit": 3})
        logging.getLogger("some.library").warning("library says")
        # An explicit id (JobLog, the heartbeat thread) wins over the context.
        job_log("d4c.worker", "job-other").info("explicit")
    logging.getLogger("d4c.api").info("after")

    out = json_logs()
    assert [r["message"] for r in out] == [
        "before",
        "unit done",
        "library says",
        "explicit",
        "after",
    ]
    for r in out:
        assert {"ts", "level", "logger", "message"} <= r.keys()
    assert "job_id" not in out[0] and "job_id" not in out[-1]
    assert [r["job_id"] for r in out[1:4]] == ["job-abc", "job-abc", "job-other"]
    assert out[1]["unit"] == 3 and out[1]["logger"] == "d4c.pipeline"


def test_celery_task_lines_carry_the_job_id(json_logs: Any) -> None:
    """The prerun/postrun signals set and clear the id around a ``d4c.*`` task."""
    app = Celery("log-test", broker="memory://")

    @app.task(name="d4c.log_probe")
    def probe(job_id: str) -> None:
        logging.getLogger("d4c.pipeline").info("stage", extra={"stage": "calibration"})
        logging.getLogger("thirdparty.lib").info("third-party line")

    @app.task(name="other.task")
    def other(x: str) -> None:
        logging.getLogger("elsewhere").info("not a job")

    # apply() runs eagerly; no .get(): an in-process worker started earlier in this process
    # (the embedded tests) leaves Celery's global "inside a worker" flag set.
    assert probe.apply(args=["job-42"]).successful()
    assert other.apply(args=["job-43"]).successful()
    logging.getLogger("d4c.worker").info("idle")

    out = json_logs()
    by_msg = {r["message"]: r for r in out}
    # Celery's own "Task ... succeeded" line is emitted before task_postrun: it has the id.
    done = [r for r in out if r["logger"] == "celery.app.trace"]
    assert [r.get("job_id") for r in done] == ["job-42", None], done
    assert by_msg["stage"]["job_id"] == "job-42"
    assert by_msg["stage"]["stage"] == "calibration"
    assert by_msg["third-party line"]["job_id"] == "job-42"
    assert "job_id" not in by_msg["not a job"]
    assert "job_id" not in by_msg["idle"]
