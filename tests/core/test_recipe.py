"""Recipe parsing and validation, and its exact JSON round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest

from d4c_core.errors import SpecError
from d4c_core.recipe import (
    CALIB_METHODS,
    PRESETS,
    CalibrationRecipe,
    QuantRecipe,
    Recipe,
    SynthRecipe,
    parse_bits,
)

ALL_BITS = [(w, a) for w in range(2, 9) for a in range(2, 9)]


@pytest.mark.parametrize(("name", "bits"), [("w4a8", (4, 8)), ("w6a6", (6, 6)), ("w8a8", (8, 8))])
def test_presets(name: str, bits: tuple[int, int]) -> None:
    assert PRESETS[name] == bits
    assert parse_bits(name) == bits
    r = Recipe.preset(name)
    assert (r.quant.weight_bits, r.quant.act_bits) == bits
    assert r.quant.bits_name == name
    assert r.quant.text_mlp_bits == 8


@pytest.mark.parametrize(("w", "a"), ALL_BITS)
def test_every_wxay_in_range_parses(w: int, a: int) -> None:
    assert parse_bits(f"w{w}a{a}") == (w, a)
    assert parse_bits({"weights": w, "activations": a}) == (w, a)
    assert parse_bits((w, a)) == (w, a)
    assert Recipe.preset(f"w{w}a{a}").quant.bits_name == f"w{w}a{a}"


def test_bits_spelling_variants() -> None:
    assert parse_bits("W4A8") == (4, 8)
    assert parse_bits(" w4a8 ") == (4, 8)


@pytest.mark.parametrize(
    "bits",
    [
        "w1a8",
        "w4a1",
        "w9a8",
        "w4a9",
        "w0a0",
        "w10a10",
        "w16a16",
        "w-1a8",
        "w4",
        "a8",
        "4a8",
        "w4a8x",
        "w4 a8",
        "w4.5a8",
        "",
        "int4",
        {"weights": 4},
        {"activations": 8},
        {"weights": 9, "activations": 8},
        {"weights": "four", "activations": 8},
        {"weights": "4", "activations": 8},
        {"weights": 4.7, "activations": 8},
        {"weights": True, "activations": 8},
        {"weights": 4, "activations": 8, "extra": 1},
        {},
        (4.0, 8),
        (1, 8),
        (4, 8, 8),
        None,
        48,
    ],
)
def test_bad_bits_are_spec_errors(bits: Any) -> None:
    with pytest.raises(SpecError):
        parse_bits(bits)


@pytest.mark.parametrize("bits", ["w1a8", "w9a9", "bogus"])
def test_bad_preset_is_spec_error(bits: str) -> None:
    with pytest.raises(SpecError):
        Recipe.preset(bits)


def test_defaults_are_the_reference_recipe() -> None:
    q = QuantRecipe()
    assert (q.weight_bits, q.act_bits, q.text_mlp_bits) == (4, 8, 8)
    assert (q.mse_p, q.mse_candidates, q.recon_iters, q.recon_batch) == (2.4, 100, 20000, 32)
    assert (q.adaround_b_start, q.adaround_b_end, q.adaround_warmup) == (20.0, 2.0, 0.2)
    assert (q.lr_alpha, q.lr_act_image, q.lr_act_text) == (1e-3, 4e-5, 4e-6)
    assert Recipe() == Recipe.preset("w4a8")


ROUND_TRIP = [
    Recipe(),
    Recipe.preset("w2a3", recon_iters=0, mse_zero_points=0, mse_max_samples=0),
    Recipe.preset("w8a8", quantize_text=False, mse_p=2.0, lr_alpha=0.1).replace(seed=123456789),
    Recipe(
        seed=7,
        quant=QuantRecipe(weight_bits=3, act_bits=5, text_mlp_bits=6, quantize_image=False),
        calibration=CalibrationRecipe(
            method="real",
            num_images=3,
            num_prompts=9,
            classnames=("cat", "hot dog", "naïve café", 'say "hi"', "日本"),
            templates=("a photo of a {c}.", "{c}"),
        ),
    ),
    Recipe().replace(quant={"adaround_lambda": 1e-7, "adaround_warmup": 0.0}, seed=2**31 - 1),
]


@pytest.mark.parametrize("recipe", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_json_round_trip_is_exact(recipe: Recipe) -> None:
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe
    assert back.to_json() == text
    assert Recipe.from_dict(json.loads(text)) == recipe
    assert json.loads(text)["version"] == Recipe.VERSION
    # Every field is in the JSON (no silently implied defaults).
    data = json.loads(text)
    assert set(data) == {"version", "seed", "quant", "calibration", "exports"}
    assert set(data["quant"]) == set(QuantRecipe.model_fields)
    assert set(data["calibration"]) == set(CalibrationRecipe.model_fields)
    hash(back)  # frozen and hashable: tuples, not lists


def test_round_trip_keeps_tuples_of_classnames() -> None:
    r = Recipe(calibration=CalibrationRecipe(classnames=("a", "b"), templates=("x {c}",)))
    back = Recipe.from_json(r.to_json())
    assert back.calibration.classnames == ("a", "b")
    assert isinstance(back.calibration.classnames, tuple)
    # Built in code from lists, the recipe still equals its JSON round trip.
    from_lists = CalibrationRecipe(classnames=["a", "b"], templates=["x {c}"])  # type: ignore[arg-type]
    assert from_lists == r.calibration


def test_partial_dict_fills_defaults() -> None:
    r = Recipe.from_dict({"quant": {"weight_bits": 6, "act_bits": 6}})
    assert r == Recipe.preset("w6a6")
    assert Recipe.from_json("{}") == Recipe()


def test_replace_is_nested() -> None:
    r = Recipe().replace(seed=5, quant={"recon_iters": 10})
    assert (r.seed, r.quant.recon_iters, r.quant.weight_bits) == (5, 10, 4)
    with pytest.raises(SpecError):
        Recipe().replace(quant={"weight_bits": 1})


BAD_JSON: list[Any] = [
    {"sed": 1},
    {"quant": {"weight_bit": 4}},
    {"calibration": {"classname": ["a"]}},
    {"version": 3},
    {"version": 0},
    {"version": "1"},
    {"version": True},
    {"seed": "1"},
    {"seed": 1.5},
    {"seed": None},
    {"quant": {"weight_bits": "4"}},
    {"quant": {"weight_bits": 4.0}},
    {"quant": {"weight_bits": True}},
    {"quant": {"weight_bits": 9}},
    {"quant": {"act_bits": 1}},
    {"quant": {"text_mlp_bits": 12}},
    {"quant": {"quantize_text": 1}},
    {"quant": {"quantize_text": "yes"}},
    {"quant": {"quantize_text": False, "quantize_image": False}},
    {"quant": {"mse_p": "2.4"}},
    {"quant": {"mse_p": 0}},
    {"quant": {"mse_candidates": 0}},
    {"quant": {"recon_iters": -1}},
    {"quant": {"recon_batch": 0}},
    {"quant": {"adaround_warmup": 1.0}},
    {"quant": {"adaround_b_end": 0.5}},
    {"quant": {"adaround_b_start": 1.5}},
    {"quant": {"adaround_lambda": -0.01}},
    {"quant": {"lr_alpha": None}},
    {"quant": []},
    {"quant": "w4a8"},
    {"calibration": {"method": "imagenet"}},
    {"calibration": {"method": 1}},
    {"calibration": {"num_images": 0}},
    {"calibration": {"num_prompts": -5}},
    {"calibration": {"classnames": "cat"}},
    {"calibration": {"classnames": [1, 2]}},
    {"calibration": {"classnames": [["cat"]]}},
    {"calibration": {"templates": ["a photo of a {}"]}},
    {"calibration": {"templates": "a {c}"}},
    [],
    "w4a8",
    None,
    3,
]


@pytest.mark.parametrize("data", BAD_JSON, ids=[json.dumps(d) for d in BAD_JSON])
def test_invalid_recipes_are_spec_errors(data: Any) -> None:
    with pytest.raises(SpecError):
        Recipe.from_json(json.dumps(data))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "{'seed': 1}",
        '{"quant": {"mse_p": NaN}}',
        '{"quant": {"lr_alpha": Infinity}}',
        '{"quant": {"adaround_lambda": -Infinity}}',
    ],
)
def test_malformed_or_non_finite_json_is_spec_error(text: str) -> None:
    with pytest.raises(SpecError):
        Recipe.from_json(text)


def test_error_messages_name_the_field() -> None:
    with pytest.raises(SpecError, match="weight_bit"):
        Recipe.from_json('{"quant": {"weight_bit": 4}}')
    with pytest.raises(SpecError, match="seed"):
        Recipe.from_json('{"seed": "x"}')
    with pytest.raises(SpecError, match="version"):
        Recipe.from_json('{"version": 3}')


# ---------------------------------------------------------------- synthesis settings


def test_synth_defaults_are_the_reference_recipe() -> None:
    s = CalibrationRecipe().synth
    assert (s.iters, s.batch, s.lr, s.tv_weight, s.temperature) == (3000, 16, 0.01, 0.1, 0.1)
    assert s.components == ("pgsi", "scg", "pae") and s.per_batch_adam is False
    assert (s.crop_min, s.crop_max, s.bg_noise) == (0.4, 0.7, 0.1)
    assert (s.kde_bandwidth, s.kde_points) == (0.01, 10)
    assert set(CALIB_METHODS) == {"noise", "real", "bns", "pse", "d4c"}


SYNTH_ROUND_TRIP = [
    Recipe(calibration=CalibrationRecipe(method="d4c", synth=SynthRecipe(components=("pgsi",)))),
    Recipe(
        calibration=CalibrationRecipe(
            method="bns", synth=SynthRecipe(iters=0, batch=3, lr=0.5, per_batch_adam=True)
        )
    ),
    Recipe().replace(calibration={"method": "pse", "synth": {"kde_points": 2, "iters": 7}}),
]


@pytest.mark.parametrize("recipe", SYNTH_ROUND_TRIP, ids=range(len(SYNTH_ROUND_TRIP)))
def test_synth_json_round_trip_is_exact(recipe: Recipe) -> None:
    text = recipe.to_json()
    back = Recipe.from_json(text)
    assert back == recipe and back.to_json() == text
    assert set(json.loads(text)["calibration"]["synth"]) == set(SynthRecipe.model_fields)
    assert isinstance(back.calibration.synth, SynthRecipe)
    hash(back)


def test_nested_replace_reaches_synth() -> None:
    r = Recipe().replace(calibration={"method": "bns", "synth": {"iters": 5}})
    assert r.calibration.synth.iters == 5 and r.calibration.synth.batch == 16
    assert r.calibration.method == "bns"


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ({"method": "noise", "synth": {"iters": 5}}, "iters: only for methods bns, pse, d4c"),
        ({"method": "real", "synth": {"per_batch_adam": True}}, "per_batch_adam: only for"),
        ({"method": "bns", "synth": {"components": ["pgsi"]}}, "only for method d4c, not bns"),
    ],
)
def test_synth_settings_that_cannot_apply_are_errors(
    calibration: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError, match=message) as e:
        Recipe.from_dict({"calibration": calibration})
    assert e.value.field == "calibration.synth"


def test_errors_carry_the_field_path() -> None:
    cases = {
        '{"calibration": {"synth": {"iters": -1}}}': "calibration.synth.iters",
        '{"quant": {"weight_bits": "4"}}': "quant.weight_bits",
        '{"calibration": {"classnames": ["a\\u202eb"]}}': "calibration.classnames.0",
        '{"seed": true}': "seed",
    }
    for text, path in cases.items():
        with pytest.raises(SpecError) as e:
            Recipe.from_json(text)
        assert e.value.field == path and str(e.value).startswith(path + ": "), str(e.value)


@pytest.mark.parametrize(
    "components", [("pgsi", "pae"), ("pae", "pgsi"), ("scg", "pgsi"), ("pae", "scg", "pgsi")]
)
def test_components_are_canonical(components: tuple[str, ...]) -> None:
    s = SynthRecipe.from_dict({"components": list(components)})
    assert s.components == tuple(c for c in ("pgsi", "scg", "pae") if c in components)


BAD_SYNTH: list[Any] = [
    {"iter": 3},
    {"iters": -1},
    {"iters": 1.5},
    {"batch": 0},
    {"lr": 0},
    {"lr": "0.01"},
    {"tv_weight": -0.1},
    {"temperature": 0},
    {"components": []},
    {"components": ["scg"]},
    {"components": ["pae"]},
    {"components": ["scg", "pae"]},
    {"components": ["pgsi", "pgsi"]},
    {"components": ["pgsi", "bogus"]},
    {"components": "pgsi"},
    {"per_batch_adam": 1},
    {"crop_min": 0.8, "crop_max": 0.7},
    {"crop_max": 1.5},
    {"crop_min": 0},
    {"bg_noise": -1},
    {"kde_bandwidth": 0},
    {"kde_points": 1},
    [],
]


@pytest.mark.parametrize("synth", BAD_SYNTH, ids=[json.dumps(d) for d in BAD_SYNTH])
def test_invalid_synth_is_spec_error(synth: Any) -> None:
    with pytest.raises(SpecError):
        Recipe.from_json(json.dumps({"calibration": {"method": "d4c", "synth": synth}}))


def test_bad_components_message_lists_the_ablations() -> None:
    with pytest.raises(SpecError, match="pgsi,scg,pae") as e:
        SynthRecipe(components=("scg",))
    assert "pgsi | pgsi,scg | pgsi,pae" in str(e.value)


# --------------------------------------------------------------------------- versions


def test_v1_recipe_upgrades_to_what_it_meant() -> None:
    """v1 kept the token table in full precision and had no exports: the upgrade says so,
    rather than giving an old stored job today's 8-bit default."""
    v1 = {"version": 1, "seed": 3, "quant": {"weight_bits": 6}}
    r = Recipe.from_dict(v1)
    assert r.version == Recipe.VERSION == 2
    assert r.quant.token_embedding_bits == 0 and r.exports == () and r.seed == 3
    assert r.quant.weight_bits == 6
    assert Recipe.from_dict({"version": 1}).quant.token_embedding_bits == 0
    assert Recipe().quant.token_embedding_bits == 8  # today's default: the table is coded
    assert Recipe.from_json(r.to_json()) == r


@pytest.mark.parametrize("version", [0, 3, True, "2"])
def test_unknown_recipe_versions_are_refused(version: Any) -> None:
    with pytest.raises(SpecError, match="version"):
        Recipe.from_dict({"version": version})


@pytest.mark.parametrize("bits", [1, 9, -1])
def test_token_embedding_bits_range(bits: int) -> None:
    with pytest.raises(SpecError, match="token_embedding_bits"):
        Recipe.from_dict({"quant": {"token_embedding_bits": bits}})


def test_table_bits_follow_the_text_tower() -> None:
    assert Recipe().quant.embedding_bits == 8
    assert Recipe.preset("w4a8", token_embedding_bits=4).quant.embedding_bits == 4
    assert Recipe.preset("w4a8", quantize_text=False).quant.embedding_bits == 0


@pytest.mark.parametrize(
    ("exports", "ok"), [([], True), (["onnx"], True), (["onnx", "onnx"], False), (["tf"], False)]
)
def test_exports_field(exports: list[str], ok: bool) -> None:
    if ok:
        assert Recipe.from_dict({"exports": exports}).exports == tuple(exports)
    else:
        with pytest.raises(SpecError, match="exports"):
            Recipe.from_dict({"exports": exports})
