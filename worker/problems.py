"""The ``error`` a failed job carries: an RFC 9457 problem object, the API's error shape.

Only messages written for users reach it (``D4CError`` texts, a storage error's reason);
anything unexpected becomes a generic problem, its traceback only in the worker's log.
"""

from __future__ import annotations

import errno
from typing import Any

from app.api.problems import PROBLEM_BASE
from d4c_core.errors import D4CError, ModelTooLarge, NonFiniteError


def problem(slug: str, title: str, detail: str, status: int) -> dict[str, Any]:
    return {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}


def from_engine(err: D4CError) -> dict[str, Any]:
    """The engine refused the job's inputs (bad checkpoint, unreachable weights, ...).

    Two refusals get their own type, so a client can tell them apart without parsing the
    detail: a model over this deployment's size budget, and one that computes NaN or Inf
    (a property of the client's weights, not a server fault).
    """
    if isinstance(err, NonFiniteError):
        return problem("non-finite", "The model produced non-finite values", str(err), 422)
    if isinstance(err, ModelTooLarge):
        return problem("model-too-large", "The model is too large", str(err), 422)
    return problem("job-rejected", "The job's inputs were rejected", str(err), 422)


def from_storage(err: OSError) -> dict[str, Any]:
    """Disk full or a read-only artifact directory: say which, never the server's paths."""
    reasons = {
        errno.ENOSPC: "no space left on the artifact storage",
        errno.EDQUOT: "the artifact storage quota is exhausted",
        errno.EACCES: "the artifact storage is not writable",
        errno.EPERM: "the artifact storage is not writable",
        errno.EROFS: "the artifact storage is read-only",
    }
    reason = reasons.get(err.errno or 0, "the artifact could not be written")
    return problem("storage-error", "Storage error", f"{reason}; retry the job later", 503)


def time_limit(limit_s: float) -> dict[str, Any]:
    return problem(
        "time-limit",
        "Time limit exceeded",
        f"the job ran longer than this deployment's limit of {limit_s:.0f} s",
        422,
    )


def worker_lost(attempts: int) -> dict[str, Any]:
    return problem(
        "worker-lost",
        "Worker lost",
        f"the worker running this job stopped {attempts} times; not retried again",
        500,
    )


def internal() -> dict[str, Any]:
    return problem(
        "internal-error", "Internal error", "the job failed unexpectedly; see the worker log", 500
    )
