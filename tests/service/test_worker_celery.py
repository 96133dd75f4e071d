"""worker/celery_app.py on app/queue.py: the delivery guarantees the worker relies on are
configured, and the API's side of the queue stays light."""

from __future__ import annotations

from pathlib import Path

from app.core.config import Settings
from app.queue import QUEUE, TASK_NAME
from worker.celery_app import make_celery


def test_redis_deployment_settings(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/9", job_time_limit_s=7200
    )
    conf = make_celery(settings).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert conf.result_backend is None and conf.task_ignore_result
    # A healthy job holding its message for the whole time limit is never redelivered.
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > 7200
    assert 7200 < conf.task_soft_time_limit < conf.task_time_limit
    assert conf.task_routes[TASK_NAME]["queue"] == QUEUE == conf.task_default_queue


def test_embedded_settings_need_no_server(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    conf = make_celery(settings).conf
    assert conf.broker_url == "filesystem://"
    opts = conf.broker_transport_options
    assert Path(opts["data_folder_in"]) == Path(opts["data_folder_out"])
    assert Path(opts["data_folder_in"]).is_relative_to(tmp_path / "broker")
    assert Path(opts["data_folder_in"]).is_dir()


def test_the_api_side_imports_no_engine() -> None:
    """``app.queue`` (the API's queue port) imports no torch, no d4c_core pipeline and no
    worker code: a message names the task, it does not import it."""
    import subprocess
    import sys

    heavy = ("torch", "open_clip", "d4c_core.pipeline", "worker")
    code = (
        "import sys, app.queue; "
        f"bad = [m for m in {heavy!r} if m in sys.modules]; "
        "sys.exit(1 if bad else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
