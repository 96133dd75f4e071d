"""Quantized artifacts: real integer weights on disk, checksummed, and loaded back.

An artifact is a directory::

    model.safetensors   integer weight codes (+ fp16 scales, uint8 zero points) of every
                        QuantLayer, activation quantizer ranges, every FP tensor as-is
    report.json         what the job measured (accuracy, timings, ...)
    manifest.json       format, model spec + fingerprint, recipe, versions, sha256 of files
    <extra files>       e.g. calibration.png

Split by concept: ``format`` (file names, metadata, checksums), ``codec`` (integer packing,
fp16 scales, per-layer encode/decode), ``write`` (filling a directory) and ``read``
(verify, load, summaries). ``d4c_core.export`` is the public writer of a quantized model.
"""

from d4c_core.artifacts.codec import finalize_scales_, pack_int, unpack_int
from d4c_core.artifacts.format import (
    CALIBRATION_SHEET,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_FILE,
    META_KEY,
    MODEL_FILE,
    REPORT_FILE,
    write_safetensors,
)
from d4c_core.artifacts.read import LoadedQuantized, inspect, load_quantized, verify, weight_bytes
from d4c_core.artifacts.write import write_artifact

__all__ = [
    "CALIBRATION_SHEET",
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "META_KEY",
    "MODEL_FILE",
    "REPORT_FILE",
    "LoadedQuantized",
    "finalize_scales_",
    "inspect",
    "load_quantized",
    "pack_int",
    "unpack_int",
    "verify",
    "weight_bytes",
    "write_artifact",
    "write_safetensors",
]
