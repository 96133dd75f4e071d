"""The recipe: every choice a quantization job makes, as versioned, JSON-exact dataclasses.

One recipe object travels from the HTTP body to the worker to the artifact manifest, so it
must round-trip through JSON exactly and refuse fields it does not know (a typo in a client's
body is an error, not a silently ignored default). ``VERSION`` is bumped whenever a field's
meaning changes; old JSON with another version is rejected rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from d4c_core.errors import SpecError

BIT_RANGE = range(2, 9)
PRESETS = {"w4a8": (4, 8), "w6a6": (6, 6), "w8a8": (8, 8), "w4a4": (4, 4)}
CALIB_METHODS = ("noise", "real", "bns", "pse", "d4c")
# D4C ablations of the paper (method spec §2); PGSI is always on, PAE/SCG switch.
D4C_COMPONENTS = ("pgsi", "scg", "pae")
D4C_ABLATIONS = (
    frozenset({"pgsi"}),
    frozenset({"pgsi", "scg"}),
    frozenset({"pgsi", "pae"}),
    frozenset({"pgsi", "scg", "pae"}),
)


def parse_bits(bits: str | dict[str, int] | tuple[int, int]) -> tuple[int, int]:
    """``"w4a8"`` or ``{"weights": 4, "activations": 8}`` -> (4, 8); each in 2..8."""
    if isinstance(bits, str):
        m = re.fullmatch(r"w(\d+)a(\d+)", bits.strip().lower())
        if not m:
            raise SpecError(f"bits {bits!r} is not of the form wXaY (e.g. w4a8)")
        w, a = int(m[1]), int(m[2])
    elif isinstance(bits, dict):
        if set(bits) != {"weights", "activations"}:
            raise SpecError("bits needs exactly the integer fields 'weights' and 'activations'")
        w, a = bits["weights"], bits["activations"]
    elif isinstance(bits, tuple | list) and len(bits) == 2:
        w, a = bits
    else:
        raise SpecError(f"bits {bits!r} is neither 'wXaY' nor {{weights, activations}}")
    for name, b in (("weight", w), ("activation", a)):
        if not isinstance(b, int) or isinstance(b, bool):
            raise SpecError(f"{name} bits must be an integer, got {b!r}")
        if b not in BIT_RANGE:
            raise SpecError(f"{name} bits {b} outside {BIT_RANGE.start}..{BIT_RANGE.stop - 1}")
    return w, a


class _Versioned:
    """JSON round trip for nested frozen dataclasses; unknown keys are errors."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        if not isinstance(data, dict):
            raise SpecError(f"{cls.__name__} must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SpecError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _SUBRECIPES.get((cls.__name__, name))
            if sub is not None:
                value = sub.from_dict(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise SpecError(f"{cls.__name__}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"recipe is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _check_types(obj: Any) -> None:
    """Reject wrong JSON types early (a string where an int belongs, bool as int)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if t == "int" and (not isinstance(v, int) or isinstance(v, bool)):
            raise SpecError(f"{type(obj).__name__}.{f.name} must be an integer, got {v!r}")
        if t == "float" and (
            not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
        ):
            raise SpecError(f"{type(obj).__name__}.{f.name} must be a finite number, got {v!r}")
        if t == "bool" and not isinstance(v, bool):
            raise SpecError(f"{type(obj).__name__}.{f.name} must be true/false, got {v!r}")
        if t == "str" and not isinstance(v, str):
            raise SpecError(f"{type(obj).__name__}.{f.name} must be a string, got {v!r}")
        if t == "tuple[str, ...]":
            if isinstance(v, list):  # constructed in code; JSON lists arrive as tuples
                v = tuple(v)
                object.__setattr__(obj, f.name, v)
            if not isinstance(v, tuple) or not all(isinstance(s, str) for s in v):
                raise SpecError(
                    f"{type(obj).__name__}.{f.name} must be a list of strings, got {v!r}"
                )


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) <= 0:
            raise SpecError(f"{type(obj).__name__}.{n} must be > 0")


@dataclass(frozen=True)
class QuantRecipe(_Versioned):
    """PTQ choices (method spec §4). Defaults are the reference recipe's values."""

    weight_bits: int = 4
    act_bits: int = 8
    # Text-encoder MLPs stay W8A8 whatever the requested bits (reference behaviour).
    text_mlp_bits: int = 8
    quantize_image: bool = True
    quantize_text: bool = True
    # Range init: Lp-norm MSE search.
    range_init_images: int = 32
    range_init_prompts: int = 32
    mse_p: float = 2.4
    mse_candidates: int = 100
    # Window positions tried per candidate range for two-sided tensors; 0 = every integer
    # zero point (the reference's exhaustive grid, ~28x slower at 8 bits).
    mse_zero_points: int = 9
    # Values per row the search scores on (evenly spaced order statistics); 0 = all.
    mse_max_samples: int = 512
    # Reconstruction (AdaRound + LSQ).
    recon_iters: int = 20000
    recon_batch: int = 32
    adaround_lambda: float = 0.01
    adaround_warmup: float = 0.2
    adaround_b_start: float = 20.0
    adaround_b_end: float = 2.0
    lr_alpha: float = 1e-3
    lr_act_image: float = 4e-5
    lr_act_text: float = 4e-6

    def __post_init__(self) -> None:
        _check_types(self)
        parse_bits((self.weight_bits, self.act_bits))
        parse_bits((self.text_mlp_bits, self.text_mlp_bits))
        _positive(self, "mse_candidates", "recon_batch", "mse_p")
        for n in ("recon_iters", "mse_zero_points", "mse_max_samples"):
            if getattr(self, n) < 0:
                raise SpecError(f"QuantRecipe.{n} must be >= 0")
        if not 0 <= self.adaround_warmup < 1:
            raise SpecError("QuantRecipe.adaround_warmup must be in [0, 1)")
        # |2h - 1|^(b - 1) in the regularizer's gradient is infinite at h = 1/2 for b < 1.
        if not 1 <= self.adaround_b_end <= self.adaround_b_start:
            raise SpecError("QuantRecipe needs 1 <= adaround_b_end <= adaround_b_start")
        if self.adaround_lambda < 0:
            raise SpecError("QuantRecipe.adaround_lambda must be >= 0")
        if not (self.quantize_image or self.quantize_text):
            raise SpecError("at least one tower must be quantized")

    @property
    def bits_name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


@dataclass(frozen=True)
class SynthRecipe(_Versioned):
    """Image synthesis for bns/pse/d4c (method spec §2-§3). Defaults are the reference's.

    ``iters`` counts outer iterations, each a pass over all images in mini-batches of
    ``batch``. ``per_batch_adam`` fixes the reference's shared-Adam quirk (one Adam over all
    images lets the ones outside the mini-batch drift on stale momentum); default off so
    results compare with the paper.
    """

    iters: int = 3000
    batch: int = 16
    lr: float = 0.01
    tv_weight: float = 0.1
    temperature: float = 0.1
    components: tuple[str, ...] = D4C_COMPONENTS
    per_batch_adam: bool = False
    # SCG: one square box per image covering a uniform crop_min..crop_max of its area.
    crop_min: float = 0.4
    crop_max: float = 0.7
    bg_noise: float = 0.1
    # PSE: Gaussian KDE of patch similarities.
    kde_bandwidth: float = 0.01
    kde_points: int = 10

    def __post_init__(self) -> None:
        _check_types(self)
        _positive(self, "batch", "lr", "temperature", "kde_bandwidth")
        if self.iters < 0:
            raise SpecError("SynthRecipe.iters must be >= 0")
        for n in ("tv_weight", "bg_noise"):
            if getattr(self, n) < 0:
                raise SpecError(f"SynthRecipe.{n} must be >= 0")
        if not 0 < self.crop_min <= self.crop_max <= 1:
            raise SpecError("SynthRecipe needs 0 < crop_min <= crop_max <= 1")
        if self.kde_points < 2:
            raise SpecError("SynthRecipe.kde_points must be >= 2")
        comps = frozenset(self.components)
        if len(comps) != len(self.components) or comps not in D4C_ABLATIONS:
            allowed = " | ".join(
                ",".join(c for c in D4C_COMPONENTS if c in a) for a in D4C_ABLATIONS
            )
            raise SpecError(
                f"D4C components {','.join(self.components) or '(none)'} are not a valid "
                f"ablation; one of {allowed}"
            )
        # Canonical order, so the same ablation always keys the same cached calibration.
        object.__setattr__(self, "components", tuple(c for c in D4C_COMPONENTS if c in comps))


@dataclass(frozen=True)
class CalibrationRecipe(_Versioned):
    """Where calibration images and prompts come from (method spec §4, last line)."""

    method: str = "noise"
    num_images: int = 128
    num_prompts: int = 512
    # Prompt set for the text tower; empty means the built-in generic set.
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    # Synthesis budget and hyper-parameters (used by bns, pse and d4c only).
    synth: SynthRecipe = field(default_factory=SynthRecipe)

    def __post_init__(self) -> None:
        _check_types(self)
        if not isinstance(self.synth, SynthRecipe):
            raise SpecError("CalibrationRecipe.synth must be a SynthRecipe object")
        if self.method not in CALIB_METHODS:
            raise SpecError(
                f"calibration method {self.method!r} unknown; one of {', '.join(CALIB_METHODS)}"
            )
        _positive(self, "num_images", "num_prompts")
        for t in self.templates:
            if "{c}" not in t:
                raise SpecError(f"template {t!r} has no '{{c}}' placeholder")


@dataclass(frozen=True)
class Recipe(_Versioned):
    """The whole job: quantization, calibration and the seed every random choice derives from."""

    VERSION: ClassVar[int] = 1
    version: int = 1
    seed: int = 0
    quant: QuantRecipe = field(default_factory=QuantRecipe)
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)

    def __post_init__(self) -> None:
        if self.version != self.VERSION:
            raise SpecError(
                f"recipe version {self.version} not supported (expected {self.VERSION})"
            )
        _check_types(self)

    @classmethod
    def preset(cls, bits: str, **quant: Any) -> Recipe:
        w, a = parse_bits(bits)
        return cls(quant=QuantRecipe(weight_bits=w, act_bits=a, **quant))

    def replace(self, **changes: Any) -> Recipe:
        """Nested replace: ``r.replace(seed=1, calibration={"synth": {"iters": 10}})``."""
        return _replace(self, changes)


def _replace(obj: Any, changes: dict[str, Any]) -> Any:
    """``dataclasses.replace`` where a dict value for a sub-recipe replaces inside it."""
    out: dict[str, Any] = {}
    for k, v in changes.items():
        cur = getattr(obj, k)
        out[k] = _replace(cur, v) if isinstance(v, dict) and dataclasses.is_dataclass(cur) else v
    return dataclasses.replace(obj, **out)


_SUBRECIPES: dict[tuple[str, str], type[_Versioned]] = {
    ("Recipe", "quant"): QuantRecipe,
    ("Recipe", "calibration"): CalibrationRecipe,
    ("CalibrationRecipe", "synth"): SynthRecipe,
}
