"""Where the stages leave their results, so a restarted job resumes instead of recomputing.

Every stage result is stored under a key: the sha256 of everything it depends on. A stage
whose stored key matches is reused; a changed input gives another key and invalidates it and,
since later keys chain earlier ones, everything after it. ``Checkpoints(None)`` stores
nothing: the in-memory ``quantize`` runs the very same stage code without a work dir.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from d4c_core.artifacts.format import write_safetensors

log = logging.getLogger("d4c.pipeline")


def stage_key(*parts: Any) -> str:
    """sha256 over the JSON of ``parts``: equal inputs, equal key, across processes."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def tensor_digest(*tensors: Tensor) -> str:
    """sha256 over dtype, shape and bytes: identifies data a key depends on, e.g. images."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Checkpoints:
    """Keyed tensor files under ``root`` (``root/<name>.safetensors``); ``None``: keep nothing."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root)

    def open(self, *subdirs: str) -> None:
        """Create the directories; called once the job's inputs proved valid, so a refused
        job leaves no work dir behind."""
        if self.root is not None:
            for sub in subdirs or ("",):
                (self.root / sub).mkdir(parents=True, exist_ok=True)

    def save(self, name: str, tensors: dict[str, Tensor], key: str) -> None:
        """Write-then-rename, so a kill never leaves a half file that looks finished."""
        if self.root is None:
            return
        path = self.root / f"{name}.safetensors"
        tmp = path.with_suffix(".tmp")
        state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_safetensors(tmp, state, metadata={"key": key})
        tmp.replace(path)

    def load(self, name: str, key: str) -> dict[str, Tensor] | None:
        """The tensors saved under ``name`` if they were saved with ``key``, else None."""
        if self.root is None:
            return None
        path = self.root / f"{name}.safetensors"
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
            return load_file(str(path))
        except Exception:  # unreadable checkpoint: recompute rather than fail
            log.warning("discarding unreadable checkpoint %s", path.name)
            return None

    def save_json(self, name: str, data: dict[str, Any]) -> None:
        """A side record (e.g. a unit's errors) next to ``name``'s tensors."""
        if self.root is not None:
            (self.root / f"{name}.json").write_text(json.dumps(data))

    def load_json(self, name: str) -> dict[str, Any]:
        if self.root is None:
            return {}
        path = self.root / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}
