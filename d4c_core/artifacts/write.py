"""Writing an artifact directory from a quantized (wrapped, range-initialized) model.

The caller owns atomicity (``d4c_core.export`` writes into a temp dir and renames it); this
module only fills a directory. The same model must give the same ``model.safetensors`` bytes,
because a resumed job is checked against an uninterrupted one by sha256.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d4c_core.artifacts.codec import REPLACED, compact_fp, encode_layer, finalize_scales_
from d4c_core.artifacts.format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_KEY,
    MODEL_FILE,
    REPORT_FILE,
    check_extra_name,
    file_entry,
    versions,
    write_safetensors,
)
from d4c_core.errors import ArtifactError
from d4c_core.models import ModelSpec
from d4c_core.quant.wrap import QuantEmbedding, WeightCoded, coded_weights
from d4c_core.recipe import Recipe

log = logging.getLogger("d4c_core.artifacts")


def _model_tensors(model: nn.Module, layers: list[tuple[str, WeightCoded]]) -> dict[str, Tensor]:
    """Integer tensors of every coded weight plus every other state-dict entry, FP ones in the
    narrowest float type that holds them exactly (``compact_fp``)."""
    tensors: dict[str, Tensor] = {}
    replaced: set[str] = set()
    with torch.no_grad():
        for name, mod in layers:
            tensors.update(encode_layer(name, mod))
            replaced.update(f"{name}.{k}" for k in REPLACED)
        seen_storage: set[int] = set()
        for key, t in model.state_dict().items():
            if key in replaced:
                continue
            if key in tensors:
                raise ArtifactError(f"state dict key {key!r} collides with a quantized tensor")
            t = compact_fp(t.detach().cpu().contiguous())
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen_storage:  # safetensors refuses shared storage
                t = t.clone()
            seen_storage.add(ptr)
            tensors[key] = t
    return tensors


def layer_bits(mod: WeightCoded) -> list[int | None]:
    """``[weight bits, activation bits]``; a table has no activation (``None``)."""
    act = None if isinstance(mod, QuantEmbedding) else mod.act_quant.bits
    return [mod.weight_quant.bits, act]


def _model_meta(layers: list[tuple[str, WeightCoded]], spec: ModelSpec, recipe: Recipe) -> str:
    """The model file's metadata as one JSON string (see ``write_artifact``)."""
    bits = {name: layer_bits(mod) for name, mod in layers}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "recipe": recipe.to_json(),
        "arch": spec.arch,
        "layer_bits": json.dumps(bits, sort_keys=True),
        # Codes are stored flat; the shape lets readers (weight_bytes, load) check the count.
        "layer_shapes": json.dumps(
            {name: list(mod.weight.shape) for name, mod in layers}, sort_keys=True
        ),
    }
    return json.dumps(meta, sort_keys=True)


def _check_extra_files(extra_files: dict[str, Path]) -> None:
    for name, src in extra_files.items():
        check_extra_name(name)
        if not Path(src).is_file():
            raise ArtifactError(f"extra file {name!r}: {src} does not exist")


def write_artifact(
    model: nn.Module,
    spec: ModelSpec,
    recipe: Recipe,
    out_dir: Path,
    *,
    fingerprint: str,
    report: dict[str, Any],
    extra_files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Write the artifact of a quantized (wrapped, range-initialized) model into ``out_dir``.

    ``spec`` is the spec the FP model came from. Weight codes are the quantizer's current
    decision (HARD AdaRound or NEAREST). ``out_dir`` must exist. Returns the manifest.
    """
    out_dir = Path(out_dir)
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)
    layers = coded_weights(model)
    if not layers:
        raise ArtifactError("model has no quantized layers (was it wrapped for quantization?)")
    changed = finalize_scales_(model)
    if changed:
        log.warning(
            "export: %d weight scales were not fp16-finalized; the exported model may differ "
            "slightly from the one evaluated (call finalize_scales_ right after range init)",
            changed,
        )
    tensors = _model_tensors(model, layers)
    # One metadata key: safetensors writes several in random order, and the same model must
    # give the same bytes (resume is checked against an uninterrupted run by sha256).
    meta = {META_KEY: _model_meta(layers, spec, recipe)}
    write_safetensors(out_dir / MODEL_FILE, tensors, metadata=meta)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    for name, src in extra_files.items():
        shutil.copyfile(src, out_dir / name)

    files = {n: file_entry(out_dir / n) for n in (MODEL_FILE, REPORT_FILE, *extra_files)}
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {**spec.to_dict(), "fingerprint": fingerprint},
        "recipe": recipe.to_dict(),
        "seed": recipe.seed,
        "versions": versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (out_dir / MANIFEST_FILE).write_text(text + "\n")
    return json.loads(text)  # what verify() will read back (tuples become lists)
