"""Job-scoped structured logging: every line a worker writes about a job carries its id.

The JSON formatting itself is ``app.core.logging`` (one setup for API and worker); log
shippers index fields, so a job's story across API, redeliveries and workers is one
``job_id`` query away.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class JobLog(logging.LoggerAdapter[logging.Logger]):
    """A logger that stamps ``job_id`` (and ``worker``) on each record, merged with the call's
    own ``extra`` (the stdlib adapter would drop the call's)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


def job_log(name: str, job_id: str, **fields: Any) -> JobLog:
    return JobLog(logging.getLogger(name), {"job_id": job_id, **fields})
