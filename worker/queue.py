"""What the API needs from the broker: send a job id, check the broker is reachable.

Imports only Celery/kombu (never torch or the engine), so the API process stays light.
A failed send is not an error for the client: the job row is already committed, and the
reaper re-sends queued jobs the broker lost or never got (see ``worker.reaper``).
"""

from __future__ import annotations

import logging

from kombu.exceptions import KombuError

from worker.celery_app import QUEUE, TASK_NAME, celery_app
from worker.settings import get_worker_settings

log = logging.getLogger("d4c.worker.queue")

# Broker errors surface as kombu errors or plain socket/OS errors depending on the transport.
BROKER_ERRORS = (KombuError, OSError, TimeoutError)


def enqueue(job_id: str) -> bool:
    """Send ``job_id`` to the workers; False (logged) when the broker is unreachable."""
    app = celery_app()
    try:
        app.send_task(
            TASK_NAME,
            args=[job_id],
            queue=QUEUE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
    except BROKER_ERRORS:
        log.warning("enqueue failed; the reaper will resend", extra={"job_id": job_id})
        return False
    return True


def ping(timeout: float | None = None) -> bool:
    """True when the broker answers within ``timeout`` seconds (readiness probe)."""
    timeout = get_worker_settings().ping_timeout_s if timeout is None else timeout
    try:
        with celery_app().connection_for_write(connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=0, timeout=timeout)
            client = getattr(conn.default_channel, "client", None)
            if client is not None and hasattr(client, "ping"):  # Redis: a real round trip
                client.ping()
    except BROKER_ERRORS:
        return False
    return True


def depth(timeout: float | None = None) -> int:
    """Messages waiting in the job queue (not counting the ones workers hold). Fails fast
    (no retries) when the broker is down, so the reaper's other duties go on."""
    timeout = get_worker_settings().ping_timeout_s if timeout is None else timeout
    with celery_app().connection_for_write(connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=0, timeout=timeout)
        ok = conn.default_channel.queue_declare(queue=QUEUE, passive=False)
        return int(ok.message_count)
