"""The shipped weights file: written (fp16 by default) and measured as loaded back, so the
model card reports what users get, not the in-memory fp32 model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from d4c_core.evaluate import zero_shot
from d4c_core.models import ModelSpec, load_clip
from d4c_core.testbed.tasks import tasks


def save_weights(model: nn.Module, path: Path, dtype: str, meta: dict[str, str]) -> None:
    """Safetensors of the state dict; float tensors as ``dtype`` (load casts back to fp32)."""
    cast = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    state = {
        k: (v.detach().to(cast) if v.is_floating_point() else v.detach()).contiguous().clone()
        for k, v in model.state_dict().items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # One key: safetensors writes a multi-key metadata map in random order (bytes would vary).
    save_file(state, str(path), metadata={"d4c_testbed": json.dumps(meta, sort_keys=True)})


def evaluate_file(arch: str, path: Path) -> dict[str, dict[str, Any]]:
    """Zero-shot top-1/top-5 of the saved file on every task's full test split."""
    loaded = load_clip(ModelSpec(arch, checkpoint=path))
    return {
        name: zero_shot(
            loaded.model, loaded.tokenizer, task.classnames, task.templates, task.split("test")
        )
        for name, task in tasks().items()
    }
