"""The ONNX export checked where it will run: ONNX Runtime against the torch quantized model.

A job that asks for ``exports: ["onnx"]`` gets, in ``report.json``'s ``onnx`` section, the
per-sample embedding cosine of ORT vs torch on the calibration images and prompts, and, when
the job has an evaluation task, ORT's zero-shot accuracy on the same test split the torch
model was scored on. The numbers are measured, not asserted: a user reads whether the file
they deploy computes what the report's accuracy was measured on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d4c_core.evaluate import zero_shot
from d4c_core.onnx_export import ort_session


class OrtClip(nn.Module):
    """``encode_image`` / ``encode_text`` of the two ONNX graphs, as torch tensors, so the
    evaluator that scores the torch model scores the ONNX files the same way."""

    def __init__(self, files: dict[str, Path]) -> None:
        super().__init__()
        self.sessions = {tower: ort_session(path) for tower, path in files.items()}
        self.register_buffer("_device", torch.zeros(0))  # evaluators read the device from it

    def _run(self, tower: str, x: Tensor) -> Tensor:
        sess = self.sessions[tower]
        feed = {sess.get_inputs()[0].name: np.ascontiguousarray(x.detach().cpu().numpy())}
        return torch.from_numpy(sess.run(None, feed)[0])

    def encode_image(self, images: Tensor) -> Tensor:
        return self._run("image", images.float())

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self._run("text", tokens.to(torch.int64))


def _cosine(got: Tensor, ref: Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(got.double(), ref.double(), dim=-1)
    return {"min": float(cos.min()), "mean": float(cos.mean()), "n": len(cos)}


def onnx_report(
    files: dict[str, Path],
    model: nn.Module,
    images: Tensor,
    tokens: Tensor,
    task: Any = None,
    tokenizer: Any = None,
    reference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """ORT vs ``model`` (the torch quantized model, on the CPU): cosines on ``images`` /
    ``tokens``, and zero-shot top-1/top-5 on ``task`` (an ``EvalTask``) when given.
    ``reference``: the torch model's zero-shot result on ``task`` if already measured (the
    job's evaluation stage), else it is measured here."""
    import onnxruntime

    ort = OrtClip(files)
    with torch.no_grad():
        ref_i, ref_t = model.encode_image(images), model.encode_text(tokens)
        out: dict[str, Any] = {
            "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
            "files": {tower: path.name for tower, path in files.items()},
            "cosine": {
                "image": _cosine(ort.encode_image(images), ref_i),
                "text": _cosine(ort.encode_text(tokens), ref_t),
            },
        }
    if task is not None and tokenizer is not None:
        data = (task.images.cpu(), task.labels.cpu())
        got = zero_shot(ort, tokenizer, task.classnames, task.templates, data)
        ref = reference or zero_shot(model, tokenizer, task.classnames, task.templates, data)
        out["zero_shot"] = {
            "task": task.name,
            "onnx": got,
            "torch": ref,
            "delta_top1": got["top1"] - ref["top1"],
        }
    return out
