#!/usr/bin/env python3
"""CLIP zero-shot classification with a D4C ONNX export, in ONNX Runtime alone.

Needs only ``onnxruntime``, ``numpy`` and ``pillow`` (no torch, no open_clip, no d4c_core).
Tokenization is the one step that needs the model's tokenizer, so the prompts come in as
token ids computed beforehand, e.g. with open_clip::

    tok = open_clip.get_tokenizer("d4c-tiny-vit")           # after `import d4c_core`
    np.save("tokens.npy", tok(prompts).numpy())              # int64 (P, context_length)
    np.save("prompt_classes.npy", np.array(class_of_prompt))  # class index of each row

Then::

    python examples/ort_zero_shot.py --onnx-dir OUT/onnx --tokens tokens.npy \\
        --prompt-classes prompt_classes.npy --images DIR --labels labels.json

``DIR`` holds image files (PNG, JPEG, ...); ``labels.json`` maps each file name in it to its
class index (optional: without it the script only predicts). The classifier is open_clip's
zero-shot one: each prompt embedding L2-normalized, averaged per class, renormalized; an
image's class is the argmax of its normalized embedding against those.

Preprocessing is open_clip's eval transform: bicubic resize of the shorter side to the
model's size and a center crop (skipped when the image is already at size), RGB, ``/255``,
then ``(x - mean) / std`` in float32. Size, mean and std come from the image graph's
metadata (``image_size``, ``mean``, ``std``); ``--image-size/--mean/--std`` fill in what the
metadata lacks and must agree with what it has. The image size may also come from the
graph's static input shape.

Prints one JSON line: ``top1`` (percent, with labels), ``n`` and the class count;
``--predictions FILE`` writes ``{file name: predicted class}`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class UsageError(Exception):
    """Bad input: reported as one ``error:`` line, exit status 2."""


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session that computes what the torch quantized model computes.

    ORT fuses a weight DequantizeLinear into ``MatMulNBits``, whose default accuracy level
    re-quantizes the activation to int8 blocks (not the exported grid); level 1 keeps the
    activation in float32. FP32 graphs are unaffected.
    """
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _metadata(sess: ort.InferenceSession) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map or {})


def _parse_size(text: str, where: str) -> tuple[int, int]:
    """``"224"`` or ``"[224, 224]"`` (height, width) -> ``(h, w)``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: image size {text!r} is not an integer") from e
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise UsageError(f"{where}: image size {text!r} is not a positive integer or [h, w]")
    return int(value[0]), int(value[1])


def _parse_triple(text: str, what: str, where: str) -> tuple[float, float, float]:
    """A JSON list (or comma-separated text) of 3 numbers."""
    try:
        value = json.loads(text if text.lstrip().startswith("[") else f"[{text}]")
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: {what} {text!r} is not 3 numbers") from e
    if not (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise UsageError(f"{where}: {what} {text!r} is not 3 numbers")
    if what == "std" and any(v <= 0 for v in value):
        raise UsageError(f"{where}: std {text!r} must be positive")
    return float(value[0]), float(value[1]), float(value[2])


def _pick(name: str, found: dict[str, object], flag: object) -> object:
    """One setting from the graph (``found``, by source) and/or its flag; they must agree."""
    values = list(found.items())
    if flag is not None:
        values.append((f"--{name}", flag))
    if not values:
        raise UsageError(f"the image graph has no {name!r} metadata: pass --{name}")
    first_src, first = values[0]
    for src, v in values[1:]:
        # Means/stds agree when they are the same float32 numbers: what the arithmetic uses.
        if not np.array_equal(np.float32(v), np.float32(first)):
            raise UsageError(f"{name}: {first_src} says {first}, {src} says {v}")
    return first


def preprocessing(
    sess: ort.InferenceSession, args: argparse.Namespace
) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """``((h, w), mean, std)`` from the graph's metadata and input shape, and the flags."""
    meta = _metadata(sess)
    sizes: dict[str, object] = {}
    if "image_size" in meta:
        sizes["metadata image_size"] = _parse_size(meta["image_size"], "metadata")
    shape = sess.get_inputs()[0].shape
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[2:]):
        sizes["the graph's input shape"] = (int(shape[2]), int(shape[3]))
    flag = _parse_size(args.image_size, "--image-size") if args.image_size else None
    size = _pick("image-size", sizes, flag)
    stats = []
    for key in ("mean", "std"):
        found = (
            {f"metadata {key}": _parse_triple(meta[key], key, "metadata")} if key in meta else {}
        )
        given = getattr(args, key)
        given = _parse_triple(given, key, f"--{key}") if given else None
        stats.append(np.asarray(_pick(key, found, given), dtype=np.float32).reshape(3, 1, 1))
    return size, stats[0], stats[1]  # type: ignore[return-value]


def load_image(path: Path, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """float32 ``(3, h, w)``: open_clip's eval transform, done with PIL and numpy.

    Same order as open_clip: resize, crop, then RGB (a palette image is thus resized as
    PIL resizes palettes, nearest neighbour), ``/ 255``, normalize, all in float32.
    """
    h, w = size
    try:
        with Image.open(path) as im:
            img = im.copy()
    except OSError as e:
        raise UsageError(f"cannot read image {path}: {e}") from e
    if img.size != (w, h):
        # Resize the shorter side to the target (torchvision's Resize(int) rule; for a
        # non-square target, the smallest size that covers it) ...
        iw, ih = img.size
        if h != w:
            scale = max(h / ih, w / iw)
            new = (max(w, round(iw * scale)), max(h, round(ih * scale)))
        elif iw <= ih:
            new = (h, int(h * ih / iw))
        else:
            new = (int(h * iw / ih), h)
        if new != img.size:
            img = img.resize(new, Image.Resampling.BICUBIC)
        # ... then center-crop (torchvision's CenterCrop offsets).
        iw, ih = img.size
        if iw < w or ih < h:
            raise UsageError(f"{path.name}: {iw}x{ih} after resize is smaller than {w}x{h}")
        left, top = round((iw - w) / 2.0), round((ih - h) / 2.0)
        img = img.crop((left, top, left + w, top + h))
    x = np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    return (x / np.float32(255.0) - mean) / std


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows over their L2 norm, as torch's F.normalize (eps 1e-12)."""
    x = x.astype(np.float32, copy=False)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def run_batches(sess: ort.InferenceSession, x: np.ndarray, batch: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate(
        [sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def class_weights(
    sess: ort.InferenceSession, tokens: np.ndarray, prompt_classes: np.ndarray, batch: int
) -> np.ndarray:
    """``(C, D)``: per class the mean of its normalized prompt embeddings, renormalized."""
    emb = l2_normalize(run_batches(sess, tokens, batch))
    n_cls = int(prompt_classes.max()) + 1
    missing = sorted(set(range(n_cls)) - set(prompt_classes.tolist()))
    if missing:
        raise UsageError(f"--prompt-classes: no prompt for class(es) {missing}")
    per_class = np.stack([emb[prompt_classes == c].mean(axis=0) for c in range(n_cls)])
    return l2_normalize(per_class)


def read_prompts(
    args: argparse.Namespace, text: ort.InferenceSession
) -> tuple[np.ndarray, np.ndarray]:
    tokens = _load_npy(args.tokens, "--tokens")
    classes = _load_npy(args.prompt_classes, "--prompt-classes")
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise UsageError(
            f"--tokens: want integer (prompts, context_length), got {tokens.dtype} {tokens.shape}"
        )
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise UsageError(
            f"--prompt-classes: want integer (prompts,), got {classes.dtype} {classes.shape}"
        )
    if len(classes) != len(tokens) or len(tokens) == 0:
        raise UsageError(f"{len(tokens)} token rows but {len(classes)} prompt classes")
    if classes.min() < 0:
        raise UsageError("--prompt-classes: class indices must be >= 0")
    ctx = _metadata(text).get("context_length")
    shape = text.get_inputs()[0].shape
    want = (
        int(ctx)
        if ctx is not None
        else (shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None)
    )
    if want is not None and tokens.shape[1] != want:
        raise UsageError(f"--tokens: rows have {tokens.shape[1]} ids, the text graph wants {want}")
    return tokens.astype(np.int64), classes.astype(np.int64)


def _load_npy(path: str, flag: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag}: cannot read {path}: {e}") from e


def list_images(folder: Path, labels: dict[str, int] | None) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"--images: {folder} is not a folder")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise UsageError(f"--images: no image files in {folder}")
    if labels is not None:
        names = {p.name for p in files}
        if names != set(labels):
            unlabeled = sorted(names - set(labels))[:3]
            absent = sorted(set(labels) - names)[:3]
            raise UsageError(
                f"--labels does not match the images (unlabeled {unlabeled}, missing {absent})"
            )
    return files


def read_labels(path: str | None, n_cls: int) -> dict[str, int] | None:
    if path is None:
        return None
    try:
        labels = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--labels: cannot read {path}: {e}") from e
    if not isinstance(labels, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_cls for v in labels.values()
    ):
        raise UsageError(f"--labels: want {{file name: class index in [0, {n_cls})}}")
    return labels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--onnx-dir", required=True, type=Path, help=f"folder with {IMAGE_FILE} and {TEXT_FILE}"
    )
    p.add_argument("--tokens", required=True, help="int64 .npy (prompts, context_length)")
    p.add_argument(
        "--prompt-classes", required=True, help="int .npy: class index of each prompt row"
    )
    p.add_argument("--images", required=True, type=Path, help="folder of image files")
    p.add_argument("--labels", help="JSON {file name: class index}; gives top1")
    p.add_argument("--predictions", help="write JSON {file name: predicted class} here")
    p.add_argument("--image-size", help="model input size (int or [h, w]) if not in the graph")
    p.add_argument("--mean", help="normalization mean, 3 numbers, if not in the metadata")
    p.add_argument("--std", help="normalization std, 3 numbers, if not in the metadata")
    p.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    p.add_argument("--batch", type=int, default=256, help="images or prompts per ORT call")
    args = p.parse_args(argv)
    if args.batch <= 0 or args.threads < 0:
        p.error("--batch must be > 0 and --threads >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        image_sess = session(args.onnx_dir / IMAGE_FILE, args.threads)
        text_sess = session(args.onnx_dir / TEXT_FILE, args.threads)
        size, mean, std = preprocessing(image_sess, args)
        tokens, prompt_classes = read_prompts(args, text_sess)
        weights = class_weights(text_sess, tokens, prompt_classes, args.batch)
        labels = read_labels(args.labels, len(weights))
        files = list_images(args.images, labels)
        preds: list[int] = []
        for i in range(0, len(files), args.batch):
            x = np.stack([load_image(f, size, mean, std) for f in files[i : i + args.batch]])
            feats = l2_normalize(image_sess.run(None, {image_sess.get_inputs()[0].name: x})[0])
            preds += np.argmax(np.float32(100.0) * feats @ weights.T, axis=1).tolist()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result: dict[str, object] = {"n": len(files), "classes": len(weights)}
    if labels is not None:
        hits = sum(int(p == labels[f.name]) for f, p in zip(files, preds, strict=True))
        result["top1"] = 100.0 * hits / len(files)
    tokenizer = _metadata(text_sess).get("tokenizer")
    if tokenizer:
        result["tokenizer"] = tokenizer
    if args.predictions:
        Path(args.predictions).write_text(
            json.dumps({f.name: p for f, p in zip(files, preds, strict=True)}), encoding="utf-8"
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
