"""Which CLIP to quantize: ModelSpec, the built-in tiny architectures, loading and fingerprints.

open_clip is the registry: built-in archs are open_clip model configs added from
``model_configs/``, so ``open_clip.create_model("d4c-tiny-vit")`` works like any other arch.
User strings are only ever looked up in open_clip's registries, never used as paths or
``hf-hub:`` names; checkpoints are local safetensors files chosen by the caller's own code.
Whether weights fit an architecture (layout, dtypes, finite values) is checked by
``d4c_core.checkpoint_check``; this module supplies the architecture's layout.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from d4c_core.checkpoint_check import (
    Layout,
    check_file_against_layout,
    check_layout,
    require_finite_weight,
    state_layout,
)
from d4c_core.errors import CheckpointError, ModelTooLarge, SpecError, WeightsUnavailable

CONFIG_DIR = Path(__file__).parent / "model_configs"
BUILTIN_ARCHS = ("d4c-tiny-rn", "d4c-tiny-vit")
BUILTIN_TAG = "builtin"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@cache
def register_builtin_archs() -> None:
    """Add the project's tiny configs to open_clip's registry (idempotent)."""
    open_clip.add_model_config(CONFIG_DIR)


def list_archs() -> list[str]:
    register_builtin_archs()
    return open_clip.list_models()


def _unknown_arch(arch: str) -> str:
    """Name the built-in models, the closest known names, and where the full list is."""
    near = difflib.get_close_matches(arch, list_archs(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return (
        f"unknown architecture {arch!r}; built-in: {', '.join(BUILTIN_ARCHS)}, or any of the "
        f"{len(list_archs())} open_clip architectures (`d4c models` lists them).{hint}"
    )


@dataclass(frozen=True)
class ModelSpec:
    """An open_clip architecture plus where its weights come from.

    ``pretrained`` is an open_clip tag (or ``"builtin"`` for the shipped tiny weights);
    ``checkpoint`` a local safetensors file. Neither means random init (tests, timing).
    """

    arch: str
    pretrained: str | None = None
    checkpoint: Path | None = None

    def __post_init__(self) -> None:
        if self.arch not in list_archs():
            raise SpecError(_unknown_arch(self.arch))
        if self.pretrained is not None and self.checkpoint is not None:
            raise SpecError("give either a pretrained tag or a checkpoint, not both")
        if self.pretrained is not None and self.pretrained != BUILTIN_TAG:
            tags = open_clip.list_pretrained_tags_by_model(self.arch)
            if self.pretrained not in tags:
                raise SpecError(
                    f"unknown pretrained tag {self.pretrained!r} for {self.arch}; "
                    f"known: {', '.join(tags) or 'none'}"
                )
        if self.pretrained == BUILTIN_TAG and self.arch not in BUILTIN_ARCHS:
            raise SpecError(f"'builtin' weights exist only for {', '.join(BUILTIN_ARCHS)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "pretrained": self.pretrained,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.name,
        }


@dataclass
class LoadedModel:
    """An FP32 CLIP in eval mode with what it needs to be fed."""

    spec: ModelSpec
    model: nn.Module
    preprocess: Any
    tokenizer: Any
    fingerprint: str

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)


def create_architecture(arch: str, device: str = "cpu") -> nn.Module:
    """Random-init model of ``arch``: the skeleton weights are loaded into.

    ``device="meta"`` builds shapes and dtypes only, allocating no weight (the default
    device is a thread-local mode, so other threads keep building real models meanwhile).
    """
    register_builtin_archs()
    logging.getLogger().disabled, was = True, logging.getLogger().disabled
    try:  # open_clip warns "initialized randomly" on the root logger; here that is intended
        with torch.device(device):
            return open_clip.create_model(arch, pretrained=None, load_weights=False, device=device)
    finally:
        logging.getLogger().disabled = was


@dataclass(frozen=True)
class _Skeleton:
    layout: Layout
    params: int


@lru_cache(maxsize=64)
def _skeleton(arch: str) -> _Skeleton:
    """``arch``'s state_dict layout and parameter count, from a meta-device build: a
    client-chosen arch costs no weight memory to size or to check a checkpoint against."""
    try:
        model = create_architecture(arch, device="meta")
    except Exception as e:  # e.g. a text tower needing a library this server lacks
        raise SpecError(f"architecture {arch} cannot be built on this server") from e
    params = sum(p.numel() for p in model.parameters())
    return _Skeleton(state_layout(model.state_dict()), params)


def count_params(arch: str) -> int:
    """Parameters of ``arch`` (cached per arch; no weights are allocated)."""
    return _skeleton(arch).params


def check_model_size(arch: str, max_params: int | None) -> None:
    """Raise ``ModelTooLarge`` when ``arch`` has more than ``max_params`` parameters.

    Called before anything is built, so a client's arch choice cannot make the server
    allocate more than the deployment's budget.
    """
    if max_params is None:
        return
    n = count_params(arch)
    if n > max_params:
        raise ModelTooLarge(
            f"{arch} has {n:,} parameters; this deployment accepts at most {max_params:,}"
        )


def fingerprint_state(arch: str, state: dict[str, torch.Tensor]) -> str:
    """sha256 over arch and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(arch.encode())
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (pickle, truncated, garbage) is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a valid safetensors file ({e})") from e


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Strict load after ``check_layout`` and a finiteness check of every tensor."""
    own = model.state_dict()
    check_layout(state_layout(own), state_layout(state), what)
    for name in own:
        require_finite_weight(name, state[name], what)
    model.load_state_dict(state, strict=True)


def check_checkpoint_file(path: Path, arch: str, what: str = "checkpoint") -> None:
    """Check a safetensors file against ``arch`` without building the model or loading the file.

    The layout comes from a meta-device build (cached per arch); the file checks themselves
    (header, names, shapes, dtypes, finite values read in bounded chunks) are
    ``d4c_core.checkpoint_check.check_file_against_layout``. Messages name ``what``, never
    ``path`` (a server's temp file).
    """
    check_file_against_layout(path, _skeleton(arch).layout, what)


def _pretrained_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    if spec.pretrained == BUILTIN_TAG:
        path = WEIGHTS_DIR / f"{spec.arch}.safetensors"
        if not path.is_file():
            raise WeightsUnavailable(f"no built-in weights shipped for {spec.arch} yet")
        return read_checkpoint(path)
    cfg = check_weights_obtainable(spec)
    hint = _unavailable_hint(spec)
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as e:  # network and hub errors come in many types
        raise WeightsUnavailable(hint) from e
    if not path:
        raise WeightsUnavailable(hint)
    try:
        model = open_clip.create_model(spec.arch, pretrained=path)
    except Exception as e:
        raise CheckpointError(f"pretrained file for {spec.arch}/{spec.pretrained}: {e}") from e
    return model.state_dict()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _unavailable_hint(spec: ModelSpec) -> str:
    return (
        f"pretrained weights {spec.arch}/{spec.pretrained} could not be obtained"
        f"{' (offline: HF_HUB_OFFLINE is set)' if _offline() else ''}; download them where the "
        "network allows and pass them as a safetensors checkpoint (--checkpoint F.safetensors)"
    )


def check_weights_obtainable(spec: ModelSpec) -> dict[str, Any]:
    """Raise ``WeightsUnavailable`` when ``spec``'s pretrained tag cannot be had here (offline
    and not in the local hub cache); else return its open_clip pretrained config.

    Cheap (no download, no model): the service calls it at submit so a job that can only fail
    is refused then, not minutes later in a worker.
    """
    assert spec.pretrained is not None and spec.pretrained != BUILTIN_TAG
    cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained)
    if _offline() and not _cached_locally(cfg):
        raise WeightsUnavailable(_unavailable_hint(spec))
    return dict(cfg)


def _cached_locally(cfg: dict[str, Any]) -> bool:
    hub = cfg.get("hf_hub")
    if not hub:
        return False
    from huggingface_hub import try_to_load_from_cache

    repo = hub.rstrip("/")
    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if isinstance(try_to_load_from_cache(repo, fname), str):
            return True
    return False


def load_clip(spec: ModelSpec, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the FP model of ``spec`` in eval mode, with preprocess, tokenizer and fingerprint."""
    register_builtin_archs()
    model = create_architecture(spec.arch)
    if spec.checkpoint is not None:
        load_state_into(
            model, read_checkpoint(spec.checkpoint), f"checkpoint {spec.checkpoint.name}"
        )
    elif spec.pretrained is not None:
        load_state_into(model, _pretrained_state(spec), f"{spec.arch}/{spec.pretrained}")
    else:
        # Random init must be reproducible: resume and fingerprints depend on it.
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_architecture(spec.arch)
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess = _eval_transform(model)
    tokenizer = open_clip.get_tokenizer(spec.arch)
    fp = fingerprint_state(spec.arch, model.state_dict())
    return LoadedModel(spec, model, preprocess, tokenizer, fp)


def _eval_transform(model: nn.Module) -> Any:
    cfg = open_clip.get_model_preprocess_cfg(model)
    return open_clip.image_transform(
        model.visual.image_size,
        is_train=False,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )
