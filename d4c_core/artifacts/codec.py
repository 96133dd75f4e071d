"""Integer weights: codes packed into bytes, fp16 scales, and the per-layer encode/decode.

The artifact ships integers rather than the fake-quant state dict because the FP weight must
not ship (it is what is being compressed) and the file size is part of the product (W4 is
about 1/8 of FP32). Decoding uses the same expression as ``WeightQuantizer.forward``, so the
loaded weight is bit-identical to the fake-quant weight that was evaluated.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from d4c_core.quant.wrap import WeightCoded, coded_weights

# State-dict entries of a QuantLayer that the artifact replaces by qweight/wscale/wzero.
REPLACED = ("weight", "weight_quant.scale", "weight_quant.zero_point", "weight_quant.alpha")
QSUFFIXES = (".qweight", ".wscale", ".wzero")
# fp16 range: the smallest positive subnormal keeps a scale from flushing to 0 (then W/s is
# inf); the largest finite keeps it from becoming inf.
_FP16_MIN, _FP16_MAX = 2.0**-24, 65504.0


def pack_int(codes: Tensor, bits: int) -> Tensor:
    """Unsigned codes in ``[0, 2^bits-1]`` -> flat uint8; bits <= 4 two per byte, low nibble first.

    Row-major flatten; an odd count is padded with one zero nibble.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    flat = codes.detach().reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > 2**bits - 1):
        raise ValueError(f"codes outside [0, {2**bits - 1}] for {bits} bits")
    u = flat.to(torch.uint8)
    if bits > 4:
        return u.cpu()
    if u.numel() % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return (u[0::2] | (u[1::2] << 4)).cpu()


def unpack_int(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_int`: the first ``numel`` codes as a flat int64 tensor."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    expected = (numel + 1) // 2 if bits <= 4 else numel
    if packed.numel() != expected:
        raise ValueError(
            f"{packed.numel()} packed bytes, expected {expected} for {numel} {bits}-bit codes"
        )
    if bits <= 4:
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:numel]
    else:
        codes = packed
    codes = codes.to(torch.int64)
    if codes.numel() and int(codes.max()) > 2**bits - 1:
        raise ValueError(f"code {int(codes.max())} does not fit {bits} bits")
    return codes


def finalize_scales_(model: nn.Module) -> int:
    """Round every coded weight's scale, in place, to fp16 precision; return how many changed.

    The artifact stores scales in fp16. Rounding the in-memory scale the same way makes the
    fake-quant model and the exported integer model bit-identical. Run it right after range
    init: in HARD mode the codes are ``floor(W/s) + (alpha >= 0) + zp``, so moving ``s`` after
    the rounding decisions were learned could flip some of them. Idempotent.
    """
    changed = 0
    with torch.no_grad():
        for _, mod in coded_weights(model):
            s = mod.weight_quant.scale
            r = s.clamp(_FP16_MIN, _FP16_MAX).half().float()
            changed += int((r != s).sum())
            s.copy_(r)
    return changed


def encode_layer(name: str, layer: WeightCoded) -> dict[str, Tensor]:
    """The artifact tensors of one layer: packed codes, fp16 scales, uint8 zero points."""
    wq = layer.weight_quant
    codes = wq.int_weight(layer.weight.detach()).round().to(torch.int64)
    return {
        f"{name}.qweight": pack_int(codes, wq.bits),
        f"{name}.wscale": wq.scale.detach().reshape(-1).cpu().half(),
        f"{name}.wzero": wq.zero_point.detach().reshape(-1).cpu().round().to(torch.uint8),
    }


def decode_layer(name: str, layer: WeightCoded, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pop one layer's artifact tensors from ``tensors``; return its state-dict entries.

    The weight is dequantized once, ``(q - zp) * s`` as ``WeightQuantizer.forward`` computes
    it, and ``alpha`` (where the layer has one) is zeroed: the loaded layer runs with weight
    fake quantization off.
    Raises KeyError for a missing tensor, ValueError/RuntimeError for malformed ones.
    """
    wq = layer.weight_quant
    packed = tensors.pop(f"{name}.qweight")
    scale = tensors.pop(f"{name}.wscale").float().reshape(wq.scale.shape)
    zp = tensors.pop(f"{name}.wzero").float().reshape(wq.zero_point.shape)
    q = unpack_int(packed, wq.bits, layer.weight.numel()).reshape(layer.weight.shape)
    state = {
        f"{name}.weight": (q.float() - zp) * scale,
        f"{name}.weight_quant.scale": scale,
        f"{name}.weight_quant.zero_point": zp,
    }
    if hasattr(wq, "alpha"):
        state[f"{name}.weight_quant.alpha"] = torch.zeros_like(layer.weight)
    return state


def compact_fp(t: Tensor) -> Tensor:
    """An FP tensor in the narrowest of fp16/bf16/fp32 that holds every value exactly.

    The FP parts of a model loaded from an fp16 checkpoint are fp16 values held in fp32;
    storing them as fp32 doubled the artifact (a tiny model's token table alone). Exactness
    is checked per tensor, so nothing is rounded: a tensor that needs fp32 stays fp32.
    """
    if t.dtype not in (torch.float32, torch.float64):
        return t
    for narrow in (torch.float16, torch.bfloat16, torch.float32):
        n = t.to(narrow)
        if torch.equal(n.to(t.dtype), t):
            return n
    return t
