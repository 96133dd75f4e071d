"""Errors a caller can act on. Each message is one line meant for a human or an API client."""


class D4CError(Exception):
    """Base of every error d4c_core raises on bad input or unavailable resources."""


class SpecError(D4CError):
    """A model spec or recipe names something that does not exist or is out of range.

    ``field`` is the dotted path of the offending recipe field when the validator knows it
    (``calibration.synth.iters``), so a caller can point at it without parsing the message.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RecipeError(SpecError, ValueError):
    """A recipe field is invalid. Also a ``ValueError`` so that a pydantic model embedding a
    recipe (the HTTP body) reports it as a validation error at the recipe's location, with
    ``field`` carrying the rest of the path."""


class ModelTooLarge(SpecError):
    """The architecture has more parameters than the caller's budget allows (checked before
    any weight is allocated)."""


class CheckpointError(D4CError):
    """A checkpoint is not safetensors, is corrupted, or does not fit the architecture."""


class NonFiniteError(D4CError):
    """The model produced NaN or Inf (weights that overflow float32 arithmetic): a property of
    the caller's model, not a failure of the server."""


class WeightsUnavailable(D4CError):
    """Pretrained weights cannot be obtained (offline); they must come as a checkpoint."""


class CalibrationError(D4CError):
    """Calibration data cannot be produced (missing folder, too few images, ...)."""


class ArtifactError(D4CError):
    """A quantized artifact is missing files or fails its checksums."""


class Cancelled(D4CError):
    """The caller asked the pipeline to stop; raised between units."""
