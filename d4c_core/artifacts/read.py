"""Reading an artifact back: checksum verification, the verified load, and summaries.

Loading rebuilds the architecture named in the manifest, wraps it with the recipe, and puts
the dequantized integer weights in with weight fake quantization off, so the loaded model
computes exactly what the in-memory fake-quant model computed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from d4c_core.artifacts.codec import QSUFFIXES, decode_layer
from d4c_core.artifacts.format import (
    FORMAT,
    MANIFEST_FILE,
    MODEL_FILE,
    READABLE_VERSIONS,
    REPORT_FILE,
    file_meta,
    json_meta,
    read_model_file,
    sha256_file,
)
from d4c_core.artifacts.write import layer_bits as coded_bits
from d4c_core.errors import ArtifactError, CheckpointError, SpecError
from d4c_core.models import _eval_transform, create_architecture, load_state_into
from d4c_core.quant.wrap import coded_weights, set_quant_state, wrap_for_quantization
from d4c_core.recipe import Recipe


def _read_manifest(out_dir: Path) -> dict[str, Any]:
    mpath = out_dir / MANIFEST_FILE
    if not mpath.is_file():
        raise ArtifactError(f"{out_dir.name}: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{MANIFEST_FILE} is not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{MANIFEST_FILE} is not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"artifact format version {manifest.get('format_version')!r} not supported "
            f"(this reader: {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return manifest


def verify(out_dir: Path) -> dict[str, Any]:
    """Check the manifest and every listed file's size and sha256; return the manifest."""
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        raise ArtifactError(f"{MANIFEST_FILE} does not list {MODEL_FILE}")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ArtifactError(f"{MANIFEST_FILE} lists an invalid file name {name!r}")
        if not isinstance(entry, dict) or "sha256" not in entry or "size" not in entry:
            raise ArtifactError(f"{MANIFEST_FILE}: entry for {name} lacks sha256/size")
        path = out_dir / name
        if not path.is_file():
            raise ArtifactError(f"artifact file {name} is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(f"{name}: size {size} != {entry['size']} in manifest")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{name}: sha256 checksum mismatch (file corrupted or modified)")
    return manifest


@dataclass
class LoadedQuantized:
    """A quantized CLIP loaded from an artifact, ready to encode (eval mode, no grads)."""

    model: nn.Module
    recipe: Recipe
    manifest: dict[str, Any]
    tokenizer: Any
    preprocess: Any


def _consistent_contents(
    out_dir: Path, manifest: dict[str, Any]
) -> tuple[Recipe, str, dict[str, Tensor], dict[str, Any]]:
    """Recipe, arch, tensors and layer bits, once the model file agrees with the manifest."""
    try:
        recipe = Recipe.from_dict(manifest["recipe"])
        arch = manifest["model"]["arch"]
    except (KeyError, TypeError, SpecError) as e:
        raise ArtifactError(f"{MANIFEST_FILE}: bad recipe or model entry ({e})") from e
    tensors, meta = read_model_file(out_dir / MODEL_FILE)
    if meta.get("arch") != arch:
        raise ArtifactError(f"{MODEL_FILE} is for {meta.get('arch')!r}, manifest says {arch!r}")
    try:
        same_recipe = Recipe.from_json(meta.get("recipe", "")) == recipe
    except SpecError:
        same_recipe = False
    if not same_recipe:
        raise ArtifactError(f"{MODEL_FILE} recipe differs from the manifest's")
    return recipe, arch, tensors, json_meta(meta, "layer_bits")


def _rebuild(
    arch: str, recipe: Recipe, tensors: dict[str, Tensor], layer_bits: dict[str, Any]
) -> nn.Module:
    """The wrapped architecture with the artifact's state; ``tensors`` is consumed."""
    try:
        model = create_architecture(arch)
    except Exception as e:  # open_clip raises RuntimeError for unknown archs
        raise ArtifactError(f"cannot build architecture {arch!r} ({e})") from e
    wrap_for_quantization(model, recipe.quant)
    layers = coded_weights(model)
    if sorted(layer_bits) != sorted(name for name, _ in layers):
        raise ArtifactError(f"{MODEL_FILE}: quantized layers do not match {arch} + recipe")
    state: dict[str, Tensor] = {}
    for name, mod in layers:
        if layer_bits[name] != coded_bits(mod):
            raise ArtifactError(f"{name}: bits {layer_bits[name]} != recipe's")
        try:
            state.update(decode_layer(name, mod, tensors))
        except KeyError as e:
            raise ArtifactError(f"{MODEL_FILE}: missing tensor {e.args[0]}") from e
        except (ValueError, RuntimeError) as e:
            raise ArtifactError(f"{MODEL_FILE}: layer {name}: {e}") from e
    leftover = [k for k in tensors if k.endswith(QSUFFIXES) and k.rsplit(".", 1)[0] in layer_bits]
    if leftover:
        raise ArtifactError(f"{MODEL_FILE}: unexpected tensor {leftover[0]}")
    state.update(tensors)
    try:
        load_state_into(model, state, MODEL_FILE)
    except CheckpointError as e:
        raise ArtifactError(str(e)) from e
    return model


def load_quantized(out_dir: Path | str, device: str | torch.device = "cpu") -> LoadedQuantized:
    """Verify an artifact and rebuild its model with the dequantized integer weights.

    Weight fake quantization is off (the weight already is ``(q - zp) * s``); every
    activation quantizer is on with its stored range.
    """
    out_dir = Path(out_dir)
    manifest = verify(out_dir)
    recipe, arch, tensors, layer_bits = _consistent_contents(out_dir, manifest)
    model = _rebuild(arch, recipe, tensors, layer_bits)
    set_quant_state(model, weights=False, acts=True)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedQuantized(
        model=model,
        recipe=recipe,
        manifest=manifest,
        tokenizer=open_clip.get_tokenizer(arch),
        preprocess=_eval_transform(model),
    )


# Bytes per value of the dtypes a coded weight is stored in (codes, scales, zero points).
_DTYPE_BYTES = {"U8": 1, "F16": 2, "F32": 4}


def weight_bytes(out_dir: Path) -> dict[str, int]:
    """Bytes of the coded weights (codes + scales + zero points) vs the same weights in FP32,
    and of the whole model file vs the whole model in FP32.

    ``quantized_bytes``/``fp32_bytes`` count the coded weights (layers and token table): what
    quantization compresses. ``file_bytes``/``fp32_model_bytes`` are what a user ships: the
    FP32 model is every coded weight and every other model tensor at 4 bytes per value
    (quantizer ranges are not model tensors and are left out of that baseline).
    """
    path = Path(out_dir) / MODEL_FILE
    quantized = other = 0
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = json_meta(file_meta(f.metadata()), "layer_shapes")
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                t = f.get_slice(key)
                numel = math.prod(t.get_shape())
                if key.endswith(QSUFFIXES):  # sizes from the header: no tensor is read
                    quantized += numel * _DTYPE_BYTES[t.get_dtype()]
                elif "_quant." not in key and t.get_dtype() in ("F16", "BF16", "F32", "F64"):
                    other += numel
    except (SafetensorError, OSError) as e:
        raise ArtifactError(f"{MODEL_FILE} is not readable ({e})") from e
    fp32 = sum(4 * math.prod(shape) for shape in shapes.values())
    return {
        "quantized_bytes": quantized,
        "fp32_bytes": fp32,
        "file_bytes": path.stat().st_size,
        "fp32_model_bytes": fp32 + 4 * other,
    }


def inspect(out_dir: Path) -> dict[str, Any]:
    """Verify an artifact and summarize it: what it is, how big, and what the job measured."""
    out_dir = Path(out_dir)
    manifest = verify(out_dir)
    wb = weight_bytes(out_dir)
    report: dict[str, Any] = {}
    if REPORT_FILE in manifest["files"]:
        try:
            report = json.loads((out_dir / REPORT_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{REPORT_FILE} is not valid JSON ({e})") from e
    model = manifest.get("model", {})
    return {
        "arch": model.get("arch"),
        "model": model,
        "recipe": manifest.get("recipe"),
        "created": manifest.get("created"),
        "versions": manifest.get("versions"),
        "files": {n: e["size"] for n, e in manifest["files"].items()},
        "checksums": "ok",
        "weights": {
            **wb,
            "ratio": wb["quantized_bytes"] / wb["fp32_bytes"] if wb["fp32_bytes"] else None,
            "file_ratio": wb["file_bytes"] / wb["fp32_model_bytes"],
        },
        "metrics": report.get("metrics") if isinstance(report, dict) else None,
    }
