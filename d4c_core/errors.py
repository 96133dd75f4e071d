"""Errors a caller can act on. Each message is one line meant for a human or an API client."""


class D4CError(Exception):
    """Base of every error d4c_core raises on bad input or unavailable resources."""


class SpecError(D4CError):
    """A model spec or recipe names something that does not exist or is out of range."""


class CheckpointError(D4CError):
    """A checkpoint is not safetensors, is corrupted, or does not fit the architecture."""


class WeightsUnavailable(D4CError):
    """Pretrained weights cannot be obtained (offline); they must come as a checkpoint."""


class CalibrationError(D4CError):
    """Calibration data cannot be produced (missing folder, too few images, ...)."""


class ArtifactError(D4CError):
    """A quantized artifact is missing files or fails its checksums."""


class Cancelled(D4CError):
    """The caller asked the pipeline to stop; raised between units."""
