"""Does a set of weights fit an architecture: names, shapes, dtypes, finite values.

Kept apart from building and loading models (``d4c_core.models``) because the same checks
serve two callers with different costs: a state_dict already in memory (``load_state_into``),
and an uploaded safetensors file that must be judged without loading it whole
(``check_file_against_layout``, behind ``d4c_core.models.check_checkpoint_file``). Nothing
here builds a model: the expected layout is handed in.
"""

from __future__ import annotations

import io
import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from d4c_core.errors import CheckpointError

# name -> (shape, safetensors dtype code) of a model's state_dict.
Layout = dict[str, tuple[tuple[int, ...], str]]

# Weights a checkpoint may hold (torch.isfinite has no float8 kernels).
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_CODES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# The upload check reads weights through one buffer of this size, reused for every tensor: a
# buffer per tensor (or an isfinite mask per chunk) left the allocator holding tens of MB.
_CHUNK_BYTES = 4 << 20


def _code(dtype: torch.dtype) -> str:
    return _CODES.get(dtype, str(dtype).removeprefix("torch."))


def state_layout(state: dict[str, torch.Tensor]) -> Layout:
    """The ``Layout`` of an in-memory state_dict, in the codes a safetensors header uses, so
    a model's own tensors and a file's header compare directly."""
    return {k: (tuple(v.shape), _code(v.dtype)) for k, v in state.items()}


def check_layout(own: Layout, got: Layout, what: str) -> None:
    """Names, shapes and dtypes of a checkpoint (``got``) against the model's (``own``), as
    one readable line instead of torch's multi-line dump. A weight must be floating point
    (an int or bool tensor of the right shape would load by silent casting); a non-float
    buffer (BatchNorm's step count) must keep its dtype."""
    missing = sorted(set(own) - set(got))
    unexpected = sorted(set(got) - set(own))
    wrong = [k for k in own if k in got and own[k][0] != got[k][0]]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {got[k][0]} vs {own[k][0]})")
        raise CheckpointError(f"{what} does not fit the architecture: " + "; ".join(parts))
    for k, (_, want) in own.items():
        dtype = got[k][1]
        if want in FLOAT_CODES and dtype not in FLOAT_CODES:
            raise CheckpointError(
                f"{what}: tensor {k} has dtype {dtype}; weights must be floating point "
                f"({', '.join(FLOAT_CODES)})"
            )
        if want not in FLOAT_CODES and dtype != want:
            raise CheckpointError(f"{what}: tensor {k} has dtype {dtype}, not {want}")


def require_finite_weight(name: str, t: torch.Tensor, what: str) -> None:
    """A NaN or Inf weight poisons every output; refuse it when loading, naming the tensor."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise CheckpointError(
            f"{what}: tensor {name} holds NaN or Inf; every weight must be finite"
        )


def check_file_against_layout(path: Path, own: Layout, what: str) -> None:
    """Check a safetensors file against the layout ``own`` without loading the file.

    safetensors validates the header (offsets contiguous, sizes matching shapes and dtypes,
    the file exactly covered); names, shapes and dtypes are compared with ``own``; then the
    data is read in bounded chunks for the finiteness check (plain reads, not a mapping of
    the whole file). Memory stays at one chunk whatever the checkpoint's size. Messages name
    ``what``, never ``path`` (a server's temp file).
    """
    try:
        with safe_open(str(path), "pt") as f:
            got: Layout = {}
            for k in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(k)
                got[k] = (tuple(sl.get_shape()), sl.get_dtype())
        check_layout(own, got, what)
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
            header.pop("__metadata__", None)
            # File order: the data is read front to back, once (contiguity was validated).
            buf = bytearray(_CHUNK_BYTES)
            for name in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                _check_finite_on_disk(fh, name, got[name], buf, what)
    except SafetensorError as e:
        raise CheckpointError(f"{what} is not a valid safetensors file ({e})") from e
    except (OSError, ValueError, struct.error) as e:
        raise CheckpointError(f"{what} is not a readable safetensors file") from e


def _check_finite_on_disk(
    fh: BinaryIO, name: str, entry: tuple[tuple[int, ...], str], buf: bytearray, what: str
) -> None:
    """Read the tensor at ``fh``'s position chunk by chunk into ``buf``, raising on the first
    NaN or Inf; leave ``fh`` at the next tensor. Only validated layouts get here, so every
    dtype is known. ``aminmax`` propagates NaN and shows Inf, without a per-element mask."""
    shape, code = entry
    dtype = _DTYPES[code]
    remaining = math.prod(shape) * dtype.itemsize
    if code not in FLOAT_CODES:
        fh.seek(remaining, io.SEEK_CUR)
        return
    while remaining:
        n = min(remaining, len(buf))
        if fh.readinto(memoryview(buf)[:n]) != n:  # the file changed under us
            raise CheckpointError(f"{what} is truncated (in tensor {name})")
        lo, hi = torch.aminmax(torch.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize))
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise CheckpointError(
                f"{what}: tensor {name} holds NaN or Inf; every weight must be finite"
            )
        remaining -= n
