"""The library on one screen: ``load_model`` → ``quantize`` → ``export``; ``load_quantized``
reads an artifact back.

``quantize`` runs the job's stages in memory on its own copy of the model (the caller's FP
model stays FP); ``export`` writes the artifact atomically. ``pipeline.run`` is the same
stages with a work dir, for jobs that must survive a kill.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import Tensor

from d4c_core.artifacts import CALIBRATION_SHEET, write_artifact
from d4c_core.calibration import save_contact_sheet
from d4c_core.calibration.sources import model_device
from d4c_core.checkpoints import Checkpoints
from d4c_core.errors import ArtifactError, SpecError
from d4c_core.models import BUILTIN_ARCHS, BUILTIN_TAG, LoadedModel, ModelSpec, load_clip
from d4c_core.quant.wrap import quant_layers
from d4c_core.recipe import Recipe
from d4c_core.stages import Progress, ProgressFn, QuantizedModel, run_stages
from d4c_core.vocabulary import STAGE_SHARES

# quantize() reports over its own stages only, so its progress also ends at 1.
_QUANTIZE_STAGES = ("calibration", "range_init", "reconstruction", "evaluation")
_SHARES = {
    s: STAGE_SHARES[s] / sum(STAGE_SHARES[t] for t in _QUANTIZE_STAGES) for s in _QUANTIZE_STAGES
}
# Given images are real data; a synthesizing method would be silently ignored, so it is an error.
_IMAGE_METHODS = ("noise", "real")


def load_model(
    model: str | ModelSpec,
    *,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """An FP CLIP ready for ``quantize``: an open_clip arch name or a ``ModelSpec``.

    A built-in arch (``d4c-tiny-vit``, ``d4c-tiny-rn``) without ``pretrained``/``checkpoint``
    gets its shipped weights. Other archs need one of them: random weights are never picked
    silently (a ``ModelSpec(arch)`` asks for them explicitly).
    """
    if isinstance(model, ModelSpec):
        if pretrained is not None or checkpoint is not None:
            raise SpecError("pass pretrained/checkpoint inside the ModelSpec, not beside it")
        return load_clip(model, device)
    ckpt = None if checkpoint is None else Path(checkpoint)
    if pretrained is None and ckpt is None:
        if model not in BUILTIN_ARCHS:
            raise SpecError(
                f"{model}: give pretrained=TAG or checkpoint=F.safetensors "
                f"(or ModelSpec({model!r}) for random weights)"
            )
        pretrained = BUILTIN_TAG
    return load_clip(ModelSpec(model, pretrained=pretrained, checkpoint=ckpt), device)


def _own_copy(model: LoadedModel | str | ModelSpec, device: Any) -> LoadedModel:
    """A LoadedModel whose module ``quantize`` may wrap in place."""
    if isinstance(model, str | ModelSpec):
        return load_model(model, device=device or "cpu")
    if not isinstance(model, LoadedModel):
        raise TypeError(
            f"quantize takes a LoadedModel (see load_model), an arch name or a ModelSpec, not "
            f"{type(model).__name__}: the artifact must name the architecture to load back"
        )
    if quant_layers(model.model):
        raise SpecError("the model is already wrapped for quantization; pass the FP model")
    module = copy.deepcopy(model.model)
    if device is not None:
        module.to(device)
    return dataclasses.replace(model, model=module)


def _calibration_input(
    calibration: Tensor | str | Path | None, recipe: Recipe, loaded: LoadedModel
) -> tuple[Tensor | None, Path | None, Recipe]:
    """(images, image folder, recipe as it will be recorded) for ``quantize``'s argument."""
    if calibration is None:
        return None, None, recipe
    method = recipe.calibration.method
    if method not in _IMAGE_METHODS:
        raise SpecError(
            f"calibration images were given, but the recipe's method {method!r} synthesizes "
            "them; use method 'real' (or drop the images)"
        )
    if isinstance(calibration, str | Path):
        return None, Path(calibration), recipe.replace(calibration={"method": "real"})
    if not isinstance(calibration, Tensor):
        raise TypeError(f"calibration must be None, a folder or a Tensor, not {type(calibration)}")
    size = loaded.image_size
    if (
        calibration.dim() != 4
        or tuple(calibration.shape[1:]) != (3, size, size)
        or len(calibration) == 0
        or not calibration.is_floating_point()
    ):
        raise SpecError(
            f"calibration images must be a float (N, 3, {size}, {size}) batch in the model's "
            f"normalized input space, got {calibration.dtype} {tuple(calibration.shape)}"
        )
    n = len(calibration)
    recorded = recipe.replace(calibration={"method": "real", "num_images": n})
    return calibration.float(), None, recorded


def quantize(
    model: LoadedModel | str | ModelSpec,
    recipe: Recipe,
    *,
    calibration: Tensor | str | Path | None = None,
    on_progress: ProgressFn | None = None,
    device: str | torch.device | None = None,
) -> QuantizedModel:
    """Calibrate, init ranges and reconstruct in memory; return the quantized model.

    ``model``: a ``LoadedModel`` (copied, never modified), or an arch name / ``ModelSpec``
    given to ``load_model``. ``calibration``: ``None`` lets the recipe's method make the
    images (noise, bns, pse, d4c); a folder or a normalized ``(N, 3, H, W)`` tensor is real
    data, recorded in the result's recipe as method ``real``. ``on_progress(stage,
    fraction)`` is called between units (raising from it stops the job). ``device``: where
    to run; default, where the model is. The global torch RNG state is left as it was.
    """
    loaded = _own_copy(model, device)
    images, image_dir, recipe = _calibration_input(calibration, recipe, loaded)
    prog = Progress(on_progress, None, shares=dict(_SHARES))
    qmodel = run_stages(loaded, recipe, Checkpoints(None), prog, image_dir=image_dir, images=images)
    qmodel.report["timings"] = dict(prog.timings)
    prog.at("evaluation", 1.0)
    return qmodel


def _calibration_sheet(qmodel: QuantizedModel, scratch: Path) -> dict[str, Path]:
    """The contact sheet of the calibration images, as an extra file, when they are known."""
    if qmodel.calibration_images is None:
        return {}
    cfg = open_clip.get_model_preprocess_cfg(qmodel.model)
    path = scratch / CALIBRATION_SHEET
    save_contact_sheet(qmodel.calibration_images.cpu(), path, cfg["mean"], cfg["std"])
    return {CALIBRATION_SHEET: path}


def _onnx_files(qmodel: QuantizedModel, scratch: Path) -> dict[str, Path]:
    """The recipe's ONNX export, checked in ONNX Runtime into ``report["onnx"]``.

    The check runs on the first ``range_init_images``/``range_init_prompts`` calibration
    inputs (what the report's embedding cosine uses) and on the job's evaluation task."""
    from d4c_core.onnx_check import onnx_report
    from d4c_core.onnx_export import export_onnx

    files = export_onnx(qmodel, scratch / "onnx")
    quant = qmodel.recipe.quant
    images = qmodel.calibration_images
    tokens = qmodel.calibration_tokens
    if images is None or tokens is None:
        raise ArtifactError("the ONNX check needs the calibration inputs of the quantized model")
    zs = qmodel.report.get("metrics", {}).get("zero_shot")
    qmodel.report["onnx"] = onnx_report(
        files,
        qmodel.model,
        images[: quant.range_init_images].cpu(),
        tokens[: quant.range_init_prompts].cpu(),
        task=qmodel.eval_task,
        tokenizer=qmodel.tokenizer,
        reference=zs["quantized"] if zs else None,
    )
    return {path.name: path for path in files.values()}


def export(qmodel: QuantizedModel, out_dir: str | Path, *, overwrite: bool = False) -> dict:
    """Write ``qmodel``'s artifact to ``out_dir``; return its manifest.

    With ``exports: ["onnx"]`` in the recipe the artifact also holds the two ONNX graphs,
    and ``report.json`` their check in ONNX Runtime (``onnx``). The files are written to
    ``.<name>.tmp`` beside it and renamed, so ``out_dir`` appears only complete. An existing
    non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ArtifactError(f"{out} exists; pass overwrite=True to replace it")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    device = model_device(qmodel.model)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            extra = _calibration_sheet(qmodel, Path(scratch))
            qmodel.model.cpu()  # integer codes are computed on the CPU, where loads decode them
            if "onnx" in qmodel.recipe.exports:
                extra |= _onnx_files(qmodel, Path(scratch))
            manifest = write_artifact(
                qmodel.model,
                qmodel.spec,
                qmodel.recipe,
                tmp,
                fingerprint=qmodel.fingerprint,
                report=qmodel.report,
                extra_files=extra,
            )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        qmodel.model.to(device)
    return manifest
