"""d4c_core: data-free quantization of CLIP models (D4C), as a plain library.

The public surface on one screen::

    from d4c_core import Recipe, export, load_model, load_quantized, quantize

    model = load_model("d4c-tiny-vit")                # FP CLIP (LoadedModel), shipped weights
    qmodel = quantize(model, Recipe.preset("w4a8"))   # calibration, range init, reconstruction
    export(qmodel, "out/tiny-vit-w4a8")               # integer safetensors + manifest + report
    clip = load_quantized("out/tiny-vit-w4a8").model  # checksums verified; a runnable CLIP

``Recipe.preset("w4a8")`` is the reference budget (hours on a CPU); README's Python section
shows the same with a budget of seconds.

``pipeline.run`` is the resumable, checkpointing driver of the same stages (CLI, worker).
The service (``app``/``worker``) wraps this package; nothing here imports web or queue code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from d4c_core.errors import D4CError
from d4c_core.recipe import Recipe

if TYPE_CHECKING:
    from d4c_core.api import export, load_model, quantize
    from d4c_core.artifacts import LoadedQuantized, load_quantized
    from d4c_core.models import LoadedModel, ModelSpec
    from d4c_core.stages import QuantizedModel

__all__ = [
    "D4CError",
    "LoadedModel",
    "LoadedQuantized",
    "ModelSpec",
    "QuantizedModel",
    "Recipe",
    "export",
    "load_model",
    "load_quantized",
    "quantize",
]

# Lazy, so `import d4c_core` stays cheap (torch/open_clip import takes seconds).
_LAZY = {
    "quantize": "d4c_core.api",
    "export": "d4c_core.api",
    "load_model": "d4c_core.api",
    "load_quantized": "d4c_core.artifacts",
    "LoadedQuantized": "d4c_core.artifacts",
    "LoadedModel": "d4c_core.models",
    "ModelSpec": "d4c_core.models",
    "QuantizedModel": "d4c_core.stages",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'd4c_core' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
