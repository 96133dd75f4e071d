"""The model card of trained built-in weights: every section, the step-for-step reproduce
command, the accuracy table and the file's own checksum."""

from __future__ import annotations

import hashlib
import re
import shlex
from pathlib import Path

from torch import nn

from d4c_core.testbed.card import model_card
from d4c_core.testbed.train import TrainConfig, parse_args


def test_model_card_sections_command_table_and_checksum(tmp_path: Path) -> None:
    out = tmp_path / "w x.safetensors"
    out.write_bytes(b"weights")
    cfg = TrainConfig(arch="d4c-tiny-vit", out=out, seed=3, batch=64, minutes=1.0)
    summary = {
        "model": nn.Linear(3, 2),  # 8 parameters
        "steps": 120,
        "warmup": 30,
        "wall_s": 90.0,
        "img_per_s": 85.3,
        "final_loss": 1.23456,
    }
    results = {"object10": {"n": 500, "top1": 81.234, "top5": 98.5}}
    card = model_card(cfg, summary, results, "python -m d4c_core.testbed.train --minutes 1")
    heads = re.findall(r"^## (.+)$", card, re.M)
    assert heads == [
        "Architecture",
        "Data",
        "Training",
        "Zero-shot accuracy (FP32 model loaded from this file)",
        "File",
    ]
    assert card.startswith("# d4c-tiny-vit: built-in testbed weights\n\n")
    assert "\n\n\n" not in card and card.endswith("`.\n")
    assert ", 8 parameters:" in card
    assert "- Steps: 120 x batch 64 = 7,680 images;" in card
    assert "- Wall time: 1.5 min (85 images/s);\n  final training loss 1.235." in card
    assert "| object10 | 10 | " in card and " | 500 | 81.23 | 98.50 |" in card
    assert f"`{hashlib.sha256(b'weights').hexdigest()}`" in card
    # The --minutes run is reproduced by its step count, with the path shell-quoted.
    repro = re.search(r"Reproduce step for step: `python -m d4c_core\.testbed\.train (.+)`", card)
    assert repro
    args = parse_args(shlex.split(repro[1]))
    assert (args.steps, args.minutes, args.warmup, args.seed, args.batch) == (120, None, 30, 3, 64)
    assert args.out == out
