"""The shipped tiny models: they load offline, classify far above chance, match their cards."""

from __future__ import annotations

import json
import re

import pytest
import torch

from d4c_core.cli import main
from d4c_core.evaluate import zero_shot
from d4c_core.models import BUILTIN_TAG, WEIGHTS_DIR, ModelSpec, load_clip
from d4c_core.testbed.shapes import KINDS
from d4c_core.testbed.tasks import OBJECT10_KINDS, tasks
from d4c_core.testbed.world import generate

SHIPPED = [
    a for a in ("d4c-tiny-vit", "d4c-tiny-rn") if (WEIGHTS_DIR / f"{a}.safetensors").is_file()
]


def test_vit_weights_are_shipped() -> None:
    assert "d4c-tiny-vit" in SHIPPED  # the README's main job depends on it


def _card_top1(arch: str, task: str) -> float:
    card = (WEIGHTS_DIR / f"{arch}.md").read_text()
    m = re.search(rf"^\| {task} \|[^\n]*?\| ([0-9.]+) \| ([0-9.]+) \|$", card, re.M)
    assert m, f"no {task} row in the {arch} card"
    return float(m[1])


@pytest.mark.parametrize("arch", SHIPPED)
def test_builtin_beats_chance_on_fresh_sample(arch: str) -> None:
    lm = load_clip(ModelSpec(arch, pretrained=BUILTIN_TAG))
    kinds = [KINDS.index(k) for k in OBJECT10_KINDS]
    batch = generate(1000, seed=12345, kinds=kinds, stream="fresh-check")
    labels = torch.tensor([kinds.index(int(k)) for k in batch.scene.kind])
    task = tasks()["object10"]
    res = zero_shot(lm.model, lm.tokenizer, task.classnames, task.templates, (batch.images, labels))
    assert res["top1"] > 50.0, res  # chance is 10 %


@pytest.mark.parametrize("arch", SHIPPED)
def test_cli_eval_reproduces_card(arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", arch, "--task", "object10", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 5000
    assert abs(res["top1"] - _card_top1(arch, "object10")) <= 1.0, res
