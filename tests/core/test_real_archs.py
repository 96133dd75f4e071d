"""Real-size open_clip architectures (random init) through the whole pipeline: slow.

A small recipe keeps the run to minutes on CPU; what is checked is that the pipeline, the
artifact and the loader handle the real layer zoo (ModifiedResNet with its attention pool,
a ViT-B/32), not quantization quality, which random weights cannot show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from d4c_core.artifacts import load_quantized, verify, weight_bytes
from d4c_core.models import ModelSpec
from d4c_core.pipeline import JobSpec, run
from d4c_core.quant.wrap import quant_layers
from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe

pytestmark = pytest.mark.slow

# text_mlp_bits=4: every weight is W4, so the size ratio has one expected value (~1/8).
RECIPE = Recipe(
    quant=QuantRecipe(
        weight_bits=4,
        act_bits=8,
        text_mlp_bits=4,
        recon_iters=2,
        mse_candidates=10,
        range_init_images=4,
        range_init_prompts=4,
    ),
    calibration=CalibrationRecipe(num_images=4, num_prompts=8),
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(("arch", "embed_dim"), [("RN50", 1024), ("ViT-B-32", 512)])
def test_real_arch_end_to_end(arch: str, embed_dim: int, tmp_path: Path) -> None:
    out = tmp_path / "OUT"
    stages: list[str] = []
    report = run(
        JobSpec(ModelSpec(arch), RECIPE),
        tmp_path / "work",
        out,
        on_progress=lambda stage, _frac: stages.append(stage),
    )
    assert stages[0] == "load" and stages[-1] == "export"

    manifest = verify(out)
    assert manifest["model"]["arch"] == arch
    assert Recipe.from_dict(manifest["recipe"]) == RECIPE
    assert json.loads((out / "report.json").read_text())["layers"] == report["layers"]

    q = load_quantized(out)
    layers = quant_layers(q.model)
    # One SQNR entry per quantized layer, in model order, each a finite number.
    assert [e["name"] for e in report["layers"]] == [i.name for i in layers]
    assert all(math.isfinite(e["sqnr_db"]) for e in report["layers"])
    assert {e["tower"] for e in report["layers"]} == {"image", "text"}
    assert len(report["units"]) > 0 and report["resumed_units"] == 0
    cos = report["metrics"]["embedding_cosine"]
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 + 1e-9 for v in cos.values())

    # The loader checked the file's per-layer bits against the recipe; these are those bits.
    for info in layers:
        bits = (info.module.weight_quant.bits, info.module.act_quant.bits)
        text_mlp = not info.name.startswith("visual.") and ".mlp." in info.name
        assert bits == ((4, 4) if text_mlp else (4, 8)), info.name  # text_mlp_bits: WkAk

    wb = weight_bytes(out)
    ratio = wb["quantized_bytes"] / wb["fp32_bytes"]
    assert 0.125 <= ratio <= 0.14, wb

    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img = q.model.encode_image(x)
        txt = q.model.encode_text(q.tokenizer(["a photo of a dog.", "a diagram"]))
    assert img.shape == (2, embed_dim) and txt.shape == (2, embed_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
