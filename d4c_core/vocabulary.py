"""Names the engine shares with everything built on it: pipeline stages and artifact files.

Kept free of heavy imports so the service's database models, metrics and CLI can import
them without loading torch. Calibration methods and D4C components are recipe vocabulary and
live with their field declarations in ``d4c_core.recipe``.
"""

from __future__ import annotations

# Pipeline stages in order, with the share of the whole job each stands for (one progress
# number for a job: stage shares weighted by how far each stage is).
STAGE_SHARES: dict[str, float] = {
    "load": 0.02,
    "calibration": 0.05,
    "range_init": 0.05,
    "reconstruction": 0.8,
    "evaluation": 0.06,
    "export": 0.02,
}
STAGES: tuple[str, ...] = tuple(STAGE_SHARES)

MODEL_FILE = "model.safetensors"
REPORT_FILE = "report.json"
MANIFEST_FILE = "manifest.json"
CALIBRATION_SHEET = "calibration.png"
# The recipe's ``exports: ["onnx"]`` (ONNX has no registered media type).
ONNX_IMAGE_FILE = "image_encoder.onnx"
ONNX_TEXT_FILE = "text_encoder.onnx"
# Every file an artifact directory may hold, with the media type it is served as.
ARTIFACT_MEDIA_TYPES: dict[str, str] = {
    MODEL_FILE: "application/octet-stream",
    MANIFEST_FILE: "application/json",
    REPORT_FILE: "application/json",
    CALIBRATION_SHEET: "image/png",
    ONNX_IMAGE_FILE: "application/octet-stream",
    ONNX_TEXT_FILE: "application/octet-stream",
}
ARTIFACT_FILES: tuple[str, ...] = tuple(ARTIFACT_MEDIA_TYPES)
# Files without which an artifact is not loadable.
REQUIRED_FILES: tuple[str, ...] = (MODEL_FILE, MANIFEST_FILE)
