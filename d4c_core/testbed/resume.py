"""A training run's resumable state: ``<out>.train.safetensors`` beside the weights.

A harder testbed tier trains for hours on a CPU, and a run may be killed at any time. The run
is a pure function of its settings and the step (each step draws its own batch from the
world's stream), so the model, AdamW's moments and the step are all it needs to continue
exactly where it stopped: a resumed run ends with the weights an uninterrupted one would.
Written as safetensors (write-then-rename, nothing unpickled), keyed by the settings, so a
changed run starts afresh instead of continuing someone else's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

# Settings that change what a step computes (not logging, threads or the output dtype).
KEYED = ("arch", "seed", "batch", "lr", "weight_decay", "warmup")


def state_path(out: Path) -> Path:
    return out.with_suffix(".train.safetensors")


def run_key(settings: dict[str, Any], total: int) -> str:
    fields = {k: settings[k] for k in KEYED} | {"total": total}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Resumed:
    step: int
    total: int
    warmup: int


def save_state(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    total: int,
    warmup: int,
    key: str,
) -> None:
    tensors: dict[str, Tensor] = {
        f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }
    for i, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{i}.{name}"] = torch.as_tensor(v).detach().contiguous().clone()
    meta = {"key": key, "step": str(step), "total": str(total), "warmup": str(warmup)}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata=meta)
    tmp.replace(path)


def load_state(
    path: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    settings: dict[str, Any],
    steps: int | None = None,
) -> Resumed | None:
    """Restore ``model`` and ``opt`` in place from ``path`` if it was written by these
    settings (and for ``steps`` steps, when given; a ``--minutes`` run keeps the count it
    planned); None, nothing touched, if there is no such state."""
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        total = int(meta.get("total", "0"))
        if meta.get("key") != run_key(settings, total) or steps not in (None, total):
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return Resumed(int(meta["step"]), total, int(meta["warmup"]))
