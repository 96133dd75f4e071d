"""The artifact's file layout and the safetensors/JSON plumbing both writing and reading use.

One place for the names (files, metadata key, format version) so the writer and the reader
cannot drift apart, and for the checksum every manifest entry and every verify relies on.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import open_clip
import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from d4c_core.errors import ArtifactError
from d4c_core.vocabulary import CALIBRATION_SHEET, MANIFEST_FILE, MODEL_FILE, REPORT_FILE

FORMAT = "d4c-quantized"
# v2: FP tensors in their narrowest exact float type, the token table may be coded (recipe
# v2). v1 (all FP tensors fp32, recipe v1) still reads: its recipe upgrades to what it meant.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_KEY = "d4c"
__all__ = ["CALIBRATION_SHEET", "MANIFEST_FILE", "MODEL_FILE", "REPORT_FILE"]
RESERVED = (MODEL_FILE, REPORT_FILE, MANIFEST_FILE)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's record of one file: what ``verify`` checks it against."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def _d4c_version() -> str:
    try:
        return importlib_metadata.version("d4c-service")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def versions() -> dict[str, str]:
    """Library versions recorded in the manifest (what produced the artifact)."""
    return {
        "d4c_core": _d4c_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def check_extra_name(name: str) -> None:
    """Extra files live directly in the artifact dir: plain names only, no overwriting ours."""
    if not name or Path(name).name != name or name in (".", "..") or name in RESERVED:
        raise ArtifactError(f"extra file name {name!r} is not allowed")


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Serialize in memory, then write with Python I/O: a full or read-only disk then raises
    ``OSError`` with its errno (``safetensors.save_file`` turns it into an opaque
    ``SafetensorError``), which callers map to a clear storage error."""
    data = save(tensors, metadata=metadata)
    with path.open("wb") as f:
        f.write(data)


def file_meta(raw: dict[str, str] | None) -> dict[str, str]:
    """The artifact's metadata fields, stored as one JSON object under ``META_KEY``."""
    try:
        meta = json.loads((raw or {})[META_KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MODEL_FILE} has no valid {META_KEY!r} metadata") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{MODEL_FILE} metadata is not an object")
    return meta


def json_meta(meta: dict[str, str], key: str) -> Any:
    """A metadata field that holds JSON (layer bits, shapes), parsed or an ArtifactError."""
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{MODEL_FILE} metadata lacks a valid {key!r}") from e


def read_model_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a model file; anything but our format is an ArtifactError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = file_meta(f.metadata())
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path.name} is not a valid safetensors file ({e})") from e
    if meta.get("format") != FORMAT or meta.get("format_version") not in map(
        str, READABLE_VERSIONS
    ):
        raise ArtifactError(f"{path.name} is not a readable {FORMAT} file")
    return tensors, meta
