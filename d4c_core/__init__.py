"""d4c_core: data-free quantization of CLIP models (D4C), as a plain library.

The service (``app``/``worker``) wraps this package; nothing here imports web or queue code.
"""

from d4c_core.errors import D4CError

__all__ = ["D4CError", "load_quantized"]


def __getattr__(name: str):
    # Lazy so `import d4c_core` stays cheap (torch/open_clip import takes seconds).
    if name == "load_quantized":
        from d4c_core.artifacts import load_quantized

        return load_quantized
    raise AttributeError(name)
