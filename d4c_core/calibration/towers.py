"""Which image towers a synthesis baseline applies to, decided cheaply or on the built model.

BNS matches BatchNorm statistics, so it needs BatchNorm (the ResNet towers); PSE reads the
attention maps of ``nn.MultiheadAttention`` blocks (the ViT towers). Asked for anything else
they would optimize nothing but TV, so it is an error instead of a silent no-op.
``check_method`` reads only open_clip's config, so the HTTP API can reject a job up front.
"""

from __future__ import annotations

import open_clip
from torch import nn

from d4c_core.errors import CalibrationError, SpecError
from d4c_core.models import register_builtin_archs
from d4c_core.recipe import CALIB_METHODS

NEEDS = {"bns": "BatchNorm layers (a ResNet tower)", "pse": "attention blocks (a ViT tower)"}


def tower_kind(arch: str) -> str:
    """``"resnet"``, ``"vit"`` or ``"timm"`` from the arch's open_clip config alone."""
    register_builtin_archs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SpecError(f"unknown architecture {arch!r}; see `open_clip.list_models()`")
    vision = cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "timm"
    # open_clip builds a ModifiedResNet when the stage depths are a list.
    return "resnet" if isinstance(vision.get("layers"), list | tuple) else "vit"


def check_method(arch: str, method: str) -> None:
    """Raise ``CalibrationError`` if ``method`` cannot run on ``arch``'s image tower.

    timm towers cannot be judged from the config; the source checks the built model.
    """
    if method not in CALIB_METHODS:
        raise SpecError(f"calibration method {method!r} unknown; one of {', '.join(CALIB_METHODS)}")
    kind = tower_kind(arch)
    if (method, kind) in {("bns", "vit"), ("pse", "resnet")}:
        raise CalibrationError(
            f"calibration method {method!r} needs {NEEDS[method]}; {arch} has a {kind} image "
            f"tower without them (use {'pse' if method == 'bns' else 'bns'}, d4c, noise or real)"
        )


def require_modules(visual: nn.Module, kind: type[nn.Module], method: str, arch: str) -> list:
    """The tower's modules of ``kind``; none is a ``CalibrationError`` naming the method."""
    found = [m for m in visual.modules() if isinstance(m, kind)]
    if not found:
        raise CalibrationError(
            f"calibration method {method!r} needs {NEEDS[method]}; the image tower of {arch} "
            f"has no {kind.__name__}"
        )
    return found
