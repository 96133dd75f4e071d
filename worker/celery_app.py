"""The worker's Celery app: the queue port's broker and message settings (``app.queue``) plus
what only a consuming worker needs (late acks, one job at a time, time limits).

Delivery is at-least-once (late acks, a requeue when the worker process dies); the task claims
the job row atomically, so a duplicate delivery is a cheap no-op, and the pipeline's work dir
makes a redelivered job resume rather than start over.
"""

from __future__ import annotations

import threading

from celery import Celery

from app.core.config import Settings, get_settings
from app.queue import message_settings


def make_celery(settings: Settings) -> Celery:
    """A new, fully configured Celery app (workers import ``worker.tasks`` through it)."""
    app = Celery("d4c", include=["worker.tasks"])
    grace = settings.worker_hard_limit_grace_s
    app.conf.update(
        **message_settings(settings),
        # At-least-once: ack after the task returns; a dead child process puts it back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job per worker process, and no job waiting behind it in a busy worker's buffer
        # (a waiting job there could not be picked up by an idle worker).
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        # The task's own deadline fails the job at a unit boundary with a clear error; the
        # hard limit only kills a child stuck inside one unit for much longer.
        task_soft_time_limit=settings.job_time_limit_s + grace / 2,
        task_time_limit=settings.job_time_limit_s + grace,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        # The cancel flag lives in the DB; revoking (or terminating) a running job is never
        # how a job stops, so Celery's revoke bookkeeping is not needed.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def celery_app() -> Celery:
    """The process-wide app for the current settings (a new one if tests change them)."""
    settings = get_settings()
    key = settings.model_dump_json()
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = make_celery(settings)
        return app
