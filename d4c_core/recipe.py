"""The recipe: every setting of a quantization job, defined once.

Each field is declared here with its type, default, bounds and description, and everything
that speaks a job derives from these declarations: the engine's validation, the JSON stored
in the job row and in ``manifest.json``, the OpenAPI schema of ``POST /jobs`` (the models are
pydantic, so FastAPI reads them directly), the ``d4c quantize`` / ``d4c submit`` flags
(``Cli`` metadata, read by ``d4c_core.recipe_cli``) and the deployment's budget limits
(``Budget`` metadata, applied by the service). Adding a setting is one field here plus the
engine code that uses it.

The JSON round trip is exact and strict: unknown fields and loosely typed values (``true``
or ``"10"`` for a number) are errors naming the field by its path. ``VERSION`` is bumped
whenever a field's meaning changes; JSON of an older version is upgraded by the explicit step
that keeps its meaning (``_UPGRADES``), JSON of an unknown version is rejected.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal, Self, get_args

from pydantic import (
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from d4c_core.errors import SpecError
from d4c_core.recipe_fields import Budget, Cli, RecipePart, field_metadata, walk_fields

__all__ = ["Budget", "Cli", "field_metadata", "walk_fields"]

BIT_RANGE = range(2, 9)
PRESETS = {"w4a8": (4, 8), "w6a6": (6, 6), "w8a8": (8, 8), "w4a4": (4, 4)}
CalibMethod = Literal["noise", "real", "bns", "pse", "d4c"]
CALIB_METHODS: tuple[str, ...] = get_args(CalibMethod)
# Methods that synthesize images from the model (the ``synth`` settings apply to them).
SYNTH_METHODS = ("bns", "pse", "d4c")
# D4C ablations of the paper (method spec §2); PGSI is always on, PAE/SCG switch.
Component = Literal["pgsi", "scg", "pae"]
D4C_COMPONENTS: tuple[str, ...] = get_args(Component)
D4C_ABLATIONS = (
    frozenset({"pgsi"}),
    frozenset({"pgsi", "scg"}),
    frozenset({"pgsi", "pae"}),
    frozenset({"pgsi", "scg", "pae"}),
)
# A prompt is text a person reads (logs, reports, the tokenizer): no C0/C1 controls or DEL
# (PostgreSQL's JSONB also refuses \u0000), and no bidi overrides or isolates, which make a
# prompt display as something other than what the model reads (Trojan Source).
PROMPT_PATTERN = r"^[^\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]*$"


Bits = Annotated[StrictInt, Field(ge=BIT_RANGE.start, le=BIT_RANGE.stop - 1)]
Number = StrictFloat
Export = Literal["onnx"]
EXPORT_FORMATS: tuple[str, ...] = get_args(Export)
PromptText = Annotated[str, Field(max_length=1000, pattern=PROMPT_PATTERN)]


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


class QuantRecipe(RecipePart):
    """PTQ choices (method spec §4). Defaults are the reference recipe's values."""

    weight_bits: Bits = Field(4, description="weight bits (2..8)")
    act_bits: Bits = Field(8, description="activation bits (2..8)")
    text_mlp_bits: Bits = Field(
        8, description="bits of the text-encoder MLPs, weights and activations (reference: 8)"
    )
    token_embedding_bits: StrictInt = Field(
        8,
        description="bits of the token-embedding table, per row (with the text tower); "
        "0 keeps it in full precision. A lookup has no activation to quantize, and the "
        "table is most of a small CLIP's bytes",
    )
    quantize_image: StrictBool = Field(True, description="quantize the image tower")
    quantize_text: StrictBool = Field(True, description="quantize the text tower")
    range_init_images: Annotated[
        StrictInt,
        Field(ge=1, description="calibration images the range-init search runs on"),
        Budget("images", if_set=True),
    ] = 32
    range_init_prompts: Annotated[
        StrictInt,
        Field(ge=1, description="calibration prompts the range-init search runs on"),
        Budget("prompts", if_set=True),
    ] = 32
    mse_p: Number = Field(2.4, gt=0, description="p of the Lp-norm range search")
    mse_candidates: Annotated[
        StrictInt,
        Field(ge=1, description="candidate ranges tried per tensor"),
        Budget("mse_candidates", if_set=True),
    ] = 100
    mse_zero_points: StrictInt = Field(
        9,
        ge=0,
        description="window positions tried per candidate for two-sided tensors; "
        "0 = every integer zero point (the reference's exhaustive grid)",
    )
    mse_max_samples: Annotated[
        StrictInt,
        Field(ge=0, description="values per row the range search scores on; 0 = all"),
        Budget("mse_samples", if_set=True),
    ] = 512
    recon_iters: Annotated[
        StrictInt,
        Field(ge=0, description="AdaRound/LSQ iterations per reconstruction unit"),
        Budget("recon_iters"),
    ] = 20000
    recon_batch: Annotated[
        StrictInt,
        Field(ge=1, description="AdaRound/LSQ mini-batch size"),
        Budget("images", if_set=True),
    ] = 32
    adaround_lambda: Number = Field(0.01, ge=0, description="AdaRound regularizer weight")
    adaround_warmup: Number = Field(
        0.2, ge=0, lt=1, description="fraction of iterations before the regularizer starts"
    )
    adaround_b_start: Number = Field(20.0, description="AdaRound annealing exponent, start")
    adaround_b_end: Number = Field(
        2.0, ge=1, description="AdaRound annealing exponent, end (>= 1, <= start)"
    )
    lr_alpha: Number = Field(1e-3, description="learning rate of the rounding variables")
    lr_act_image: Number = Field(4e-5, description="LSQ step learning rate, image tower")
    lr_act_text: Number = Field(4e-6, description="LSQ step learning rate, text tower")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        # |2h - 1|^(b - 1) in the regularizer's gradient is infinite at h = 1/2 for b < 1.
        if self.adaround_b_end > self.adaround_b_start:
            raise ValueError("needs adaround_b_end <= adaround_b_start")
        if not (self.quantize_image or self.quantize_text):
            raise ValueError("at least one tower must be quantized")
        if self.token_embedding_bits != 0 and self.token_embedding_bits not in BIT_RANGE:
            raise ValueError(
                f"token_embedding_bits {self.token_embedding_bits}: 0 (full precision) or "
                f"{BIT_RANGE.start}..{BIT_RANGE.stop - 1}"
            )
        return self

    @property
    def embedding_bits(self) -> int:
        """Bits the token table is stored at; 0: full precision (also without the text tower)."""
        return self.token_embedding_bits if self.quantize_text else 0

    @property
    def bits_name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


class SynthRecipe(RecipePart):
    """Image synthesis for bns/pse/d4c (method spec §2-§3). Defaults are the reference's.

    ``iters`` counts outer iterations, each a pass over all images in mini-batches of
    ``batch``. ``per_batch_adam`` fixes the reference's shared-Adam quirk (one Adam over all
    images lets the ones outside the mini-batch drift on stale momentum); default off so
    results compare with the paper.
    """

    iters: Annotated[
        StrictInt,
        Field(ge=0, description="outer synthesis iterations (reference: 3000)"),
        Budget("synth_iters"),
        Cli("--synth-iters"),
    ] = 3000
    batch: Annotated[
        StrictInt, Field(ge=1, description="synthesis mini-batch"), Cli("--synth-batch")
    ] = 16
    lr: Annotated[Number, Field(gt=0, description="synthesis learning rate"), Cli("--synth-lr")] = (
        0.01
    )
    tv_weight: Number = Field(0.1, ge=0, description="total-variation prior weight")
    temperature: Number = Field(0.1, gt=0, description="PGSI softmax temperature")
    components: Annotated[
        tuple[Component, ...],
        Field(description="D4C ablation (d4c only): pgsi, pgsi+scg, pgsi+pae or all three"),
        Cli("--d4c-components"),
    ] = D4C_COMPONENTS
    per_batch_adam: Annotated[
        StrictBool,
        Field(description="one Adam state per mini-batch (fixes the reference's shared Adam)"),
        Cli("--per-batch-adam"),
    ] = False
    crop_min: Number = Field(0.4, gt=0, le=1, description="SCG: smallest crop, area fraction")
    crop_max: Number = Field(0.7, gt=0, le=1, description="SCG: largest crop, area fraction")
    bg_noise: Number = Field(0.1, ge=0, description="SCG: background noise level")
    kde_bandwidth: Number = Field(0.01, gt=0, description="PSE: KDE bandwidth")
    kde_points: StrictInt = Field(10, ge=2, description="PSE: KDE support points")

    @field_validator("components", mode="after")
    @classmethod
    def _ablation(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        comps = frozenset(value)
        if len(comps) != len(value) or comps not in D4C_ABLATIONS:
            allowed = " | ".join(
                ",".join(c for c in D4C_COMPONENTS if c in a) for a in D4C_ABLATIONS
            )
            raise ValueError(
                f"D4C components {','.join(value) or '(none)'} are not a valid ablation; "
                f"one of {allowed}"
            )
        # Canonical order, so the same ablation always keys the same cached calibration.
        return tuple(c for c in D4C_COMPONENTS if c in comps)

    @model_validator(mode="after")
    def _crops(self) -> Self:
        if self.crop_min > self.crop_max:
            raise ValueError("needs crop_min <= crop_max")
        return self


class CalibrationRecipe(RecipePart):
    """Where calibration images and prompts come from (method spec §4, last line)."""

    method: Annotated[
        CalibMethod,
        Field(description="calibration source: noise, real (a local folder), bns, pse, d4c"),
        Cli("--calib"),
    ] = "noise"
    num_images: Annotated[
        StrictInt,
        Field(ge=1, description="calibration images"),
        Budget("images"),
        Cli("--images"),
    ] = 128
    num_prompts: Annotated[
        StrictInt,
        Field(ge=1, description="calibration prompts for the text tower"),
        Budget("prompts"),
    ] = 512
    classnames: Annotated[
        tuple[PromptText, ...],
        Field(description="prompt class names; empty: the built-in generic set"),
        Budget("prompts"),
        Cli("--prompts", lines_file=True),
    ] = ()
    templates: Annotated[
        tuple[PromptText, ...],
        Field(description="prompt templates, each with a {c} placeholder"),
        Budget("prompts"),
        Cli("--prompt-templates", lines_file=True),
    ] = ()
    synth: SynthRecipe = Field(
        default_factory=SynthRecipe, description="synthesis settings (bns, pse, d4c only)"
    )

    @field_validator("templates", mode="after")
    @classmethod
    def _placeholders(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for t in value:
            if "{c}" not in t:
                raise ValueError(f"template {t!r} has no '{{c}}' placeholder")
        return value

    @field_validator("synth", mode="after")
    @classmethod
    def _synth_applies(cls, synth: SynthRecipe, info: ValidationInfo) -> SynthRecipe:
        # A setting that cannot take effect is a mistake in the request, not a no-op.
        method = info.data.get("method")
        if method is None:  # method itself was invalid: reported on its own
            return synth
        default = SynthRecipe()
        changed = [n for n in type(synth).model_fields if getattr(synth, n) != getattr(default, n)]
        if method not in SYNTH_METHODS and changed:
            raise ValueError(
                f"{', '.join(changed)}: only for methods {', '.join(SYNTH_METHODS)}, not {method}"
            )
        if method != "d4c" and "components" in changed:
            raise ValueError(f"components: only for method d4c, not {method}")
        return synth


class Recipe(RecipePart):
    """The whole job: quantization, calibration and the seed every random choice derives from."""

    VERSION: ClassVar[int] = 2
    version: StrictInt = Field(2, description="recipe format version (1 is upgraded)")
    seed: StrictInt = Field(0, ge=0, lt=2**31, description="seed of every random choice")
    quant: QuantRecipe = Field(default_factory=QuantRecipe, description="quantization")
    calibration: CalibrationRecipe = Field(
        default_factory=CalibrationRecipe, description="calibration data"
    )
    exports: Annotated[
        tuple[Export, ...],
        Field(description="extra formats the job writes into the artifact: onnx"),
        Cli("--export"),
    ] = ()

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Older recipe JSON, upgraded step by step to what it meant when it was written."""
        if not isinstance(data, dict) or "version" not in data:
            return data
        version = data["version"]
        while isinstance(version, int) and not isinstance(version, bool) and version in _UPGRADES:
            data = _UPGRADES[version](data)
            version = data["version"]
        return data

    @field_validator("version", mode="after")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != cls.VERSION:
            raise ValueError(f"recipe version {value} not supported (expected {cls.VERSION})")
        return value

    @field_validator("exports", mode="after")
    @classmethod
    def _unique_exports(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("each export format at most once")
        return tuple(sorted(value))

    @classmethod
    def preset(cls, bits: str, **quant: Any) -> Recipe:
        w, a = parse_bits(bits)
        return cls(quant=QuantRecipe(weight_bits=w, act_bits=a, **quant))


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 stored the token-embedding table in full precision and had no exports."""
    quant = data.get("quant", {})
    if isinstance(quant, dict) and "token_embedding_bits" not in quant:
        quant = {**quant, "token_embedding_bits": 0}
    return {**data, "version": 2, "quant": quant}


_UPGRADES = {1: _v1_to_v2}
