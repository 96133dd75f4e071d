"""How good is a quantized CLIP: zero-shot accuracy, embedding agreement, per-layer SQNR.

Zero-shot follows CLIP_benchmark: a class's weight is the renormalized mean of its
L2-normalized template embeddings, logits are ``100 * norm(image) @ W``. Whatever model is
passed is used for both towers, so a quantized model is scored with its quantized text tower.
The FP reference of a wrapped model is the same model under ``fp_mode``: no second copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from d4c_core.calibration.prompts import fill_template
from d4c_core.calibration.sources import list_images, load_rgb, model_device
from d4c_core.errors import SpecError
from d4c_core.finite import require_finite
from d4c_core.quant.wrap import fp_mode, quant_layers

# Reported when a layer's quantization error is exactly 0 (SQNR would be +inf, not JSON).
SQNR_CAP_DB = 200.0

Batches = Iterable[tuple[Tensor, Tensor]] | tuple[Tensor, Tensor]


@contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no grad for the block, restoring the caller's train flag after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was)


def _chunks(x: Tensor, batch: int) -> Iterator[Tensor]:
    if batch <= 0:
        raise SpecError(f"batch must be > 0, got {batch}")
    for i in range(0, x.shape[0], batch):
        yield x[i : i + batch]


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    device: str | torch.device = "cpu",
    batch: int = 256,
) -> Tensor:
    """Class weights ``(D, C)``: per class, mean of normalized template embeddings, renormed."""
    if not classnames:
        raise SpecError("zero-shot needs at least one class name")
    if not templates:
        raise SpecError("zero-shot needs at least one template")
    prompts = [fill_template(t, c) for c in classnames for t in templates]
    with _eval(model):
        embs = [
            F.normalize(
                model.encode_text(tokenizer(prompts[i : i + batch]).to(device)).float(), dim=-1
            )
            for i in range(0, len(prompts), batch)
        ]
    per_class = torch.cat(embs).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def _as_batches(images: Batches, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Accept either an iterable of (x, y) batches or one (images, labels) tensor pair."""
    if (
        isinstance(images, tuple)
        and len(images) == 2
        and all(isinstance(t, Tensor) for t in images)
    ):
        x, y = images
        if x.shape[0] != y.shape[0]:
            raise SpecError(f"{x.shape[0]} images but {y.shape[0]} labels")
        yield from zip(_chunks(x, batch), _chunks(y, batch), strict=True)
    else:
        yield from images


def zero_shot(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    images: Batches,
    batch: int = 256,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent (top-k with k = min(5, classes)) and image count."""
    device = model_device(model)
    w = zero_shot_classifier(model, tokenizer, classnames, templates, device, batch)
    k = min(5, len(classnames))
    top1 = topk = n = 0
    with _eval(model):
        for x, y in _as_batches(images, batch):
            feats = F.normalize(model.encode_image(x.to(device)).float(), dim=-1)
            logits = 100.0 * feats @ w
            pred = logits.topk(k, dim=-1).indices
            hit = pred == y.to(device).view(-1, 1)
            top1 += int(hit[:, 0].sum())
            topk += int(hit.any(dim=1).sum())
            n += int(y.shape[0])
    if n == 0:
        raise SpecError("no images to evaluate")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * topk / n, "n": n}


def read_lines(path: Path) -> list[str]:
    """Non-blank, stripped lines of a text file (class names, templates)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read {path}: {e}") from e
    lines = [s for s in (line.strip() for line in text.splitlines()) if s]
    if not lines:
        raise SpecError(f"{path} is empty")
    return lines


def image_folder(
    path: Path, classnames: Sequence[str], preprocess: Callable[[Image.Image], Tensor]
) -> tuple[Tensor, Tensor]:
    """Images and labels from ``path/<classname>/**/*.png``; folder names must be classnames.

    Classes without a folder are allowed (a subset is evaluated); a folder whose name is not
    a class is an error, since silently skipping it would inflate the accuracy.
    """
    root = Path(path)
    if not root.is_dir():
        raise SpecError(f"image folder {root} does not exist")
    index = {c: i for i, c in enumerate(classnames)}
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [d.name for d in dirs if d.name not in index]
    if unknown:
        raise SpecError(f"folder(s) in {root} that are not class names: {', '.join(unknown)}")
    xs: list[Tensor] = []
    ys: list[int] = []
    for d in dirs:
        for f in list_images(d):
            try:
                img = load_rgb(f)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise SpecError(f"cannot read image {f.relative_to(root).as_posix()}: {e}") from e
            xs.append(preprocess(img))
            ys.append(index[d.name])
    if not xs:
        raise SpecError(f"no images found in class folders under {root}")
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def zero_shot_folder(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    preprocess: Callable[[Image.Image], Tensor],
    classnames_file: Path,
    templates_file: Path,
    images_dir: Path,
    batch: int = 256,
) -> dict[str, Any]:
    """``d4c eval``'s work: read the class and template files, load the folder, score it."""
    classnames = read_lines(classnames_file)
    templates = read_lines(templates_file)
    for t in templates:
        fill_template(t, "x")  # every template must have {c}; fail before loading images
    data = image_folder(images_dir, classnames, preprocess)
    return zero_shot(model, tokenizer, classnames, templates, data, batch)


def _embed(model: nn.Module, images: Tensor, tokens: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    device = model_device(model)
    with _eval(model):
        img = torch.cat([model.encode_image(x.to(device)).float() for x in _chunks(images, batch)])
        txt = torch.cat([model.encode_text(t.to(device)).float() for t in _chunks(tokens, batch)])
    return img, txt


def _cosine_stats(fp: tuple[Tensor, Tensor], q: tuple[Tensor, Tensor]) -> dict[str, float]:
    # A NaN cosine would be reported as a metric; it means the model itself is broken.
    require_finite("in the full-precision embeddings", *fp)
    require_finite("in the quantized model's embeddings", *q)
    img = F.cosine_similarity(fp[0].double(), q[0].double(), dim=-1)
    txt = F.cosine_similarity(fp[1].double(), q[1].double(), dim=-1)
    return {
        "image": float(img.mean()),
        "text": float(txt.mean()),
        "image_min": float(img.min()),
        "text_min": float(txt.min()),
    }


def embedding_cosine(
    fp_model: nn.Module, q_model: nn.Module, images: Tensor, tokens: Tensor, batch: int = 256
) -> dict[str, float]:
    """Mean and worst cosine between two models' final image and text embeddings."""
    return _cosine_stats(
        _embed(fp_model, images, tokens, batch), _embed(q_model, images, tokens, batch)
    )


def embedding_cosine_fp_mode(
    model: nn.Module, images: Tensor, tokens: Tensor, batch: int = 256
) -> dict[str, float]:
    """``embedding_cosine`` of a wrapped model against itself with quantization switched off."""
    with fp_mode(model):
        fp = _embed(model, images, tokens, batch)
    return _cosine_stats(fp, _embed(model, images, tokens, batch))


def sqnr_db(signal_energy: float, error_energy: float) -> float:
    """``10 log10(signal / error)``, capped to +-SQNR_CAP_DB so it stays a finite float."""
    if error_energy <= 0.0:
        return SQNR_CAP_DB
    if signal_energy <= 0.0:
        return -SQNR_CAP_DB
    return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(signal_energy / error_energy)))


def layer_sqnr(
    model: nn.Module, images: Tensor, tokens: Tensor, batch: int = 64
) -> list[dict[str, Any]]:
    """Per quantized layer, SQNR (dB) of its output: FP (``fp_mode``) vs quantized model.

    Errors accumulate through the network, so this is end-to-end damage at each layer, not
    each layer's isolated error. Per chunk of ``batch`` inputs the FP outputs are held only
    until the quantized pass consumes them, and energies are summed in float64.
    """
    layers = quant_layers(model)
    if not layers:
        raise SpecError("model has no quantized layers")
    signal = [0.0] * len(layers)
    error = [0.0] * len(layers)
    seen = [0] * len(layers)
    fp_out: list[list[Tensor]] = [[] for _ in layers]
    mode = {"fp": True}

    def hook(i: int) -> Callable[[nn.Module, Any, Tensor], None]:
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            if mode["fp"]:
                fp_out[i].append(out.detach())
                return
            if not fp_out[i]:
                raise RuntimeError(f"{layers[i].name} ran more often quantized than in FP")
            ref = fp_out[i].pop(0).double()
            signal[i] += float((ref * ref).sum())
            error[i] += float(((ref - out.detach().double()) ** 2).sum())
            seen[i] += 1

        return fn

    handles = [info.module.register_forward_hook(hook(i)) for i, info in enumerate(layers)]
    device = model_device(model)
    try:
        with _eval(model):
            passes = [(model.encode_image, x) for x in _chunks(images, batch)]
            passes += [(model.encode_text, t) for t in _chunks(tokens, batch)]
            for encode, inp in passes:
                mode["fp"] = True
                with fp_mode(model):
                    encode(inp.to(device))
                mode["fp"] = False
                encode(inp.to(device))
                if any(fp_out):  # every FP output must have met its quantized twin
                    raise RuntimeError("quantized pass ran fewer layer calls than the FP pass")
    finally:
        for h in handles:
            h.remove()
    never = [info.name for info, s in zip(layers, seen, strict=True) if s == 0]
    if never:
        raise RuntimeError(f"quantized layer(s) never ran: {', '.join(never)}")
    return [
        {"name": info.name, "tower": info.tower, "sqnr_db": sqnr_db(s, e)}
        for info, s, e in zip(layers, signal, error, strict=True)
    ]
