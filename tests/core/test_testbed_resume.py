"""Training resumes from its last state to the weights an uninterrupted run ends with."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

import d4c_core.testbed.train as train_mod
from d4c_core.testbed.resume import state_path
from d4c_core.testbed.train import TrainConfig, train


def _cfg(out: Path, **kw: object) -> TrainConfig:
    base = TrainConfig(
        arch="d4c-tiny-rn",
        out=out,
        steps=5,
        batch=8,
        warmup=2,
        threads=1,
        log_every=100,
        eval_every=100,
        checkpoint_every=2,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _weights(summary: dict) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in summary["model"].state_dict().items()}


def test_killed_run_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = _weights(train(_cfg(tmp_path / "a.safetensors")))

    out = tmp_path / "b.safetensors"
    real_step, calls = train_mod.train_step, []

    def dies_at_step_4(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # a kill between states 2 and 4
        return real_step(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(train_mod, "train_step", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(out))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert state_path(out).is_file()

    resumed = train(_cfg(out))
    assert resumed["resumed_at"] == 2 and resumed["steps"] == 5
    got = _weights(resumed)
    assert got.keys() == straight.keys()
    assert all(torch.equal(got[k], straight[k]) for k in got)


def test_state_of_other_settings_is_not_resumed(tmp_path: Path) -> None:
    out = tmp_path / "c.safetensors"
    train(_cfg(out))  # leaves the state of step 4 (main() deletes it with the weights)
    assert train(_cfg(out, steps=6))["resumed_at"] == 0  # another length
    train(_cfg(out))
    assert train(_cfg(out))["resumed_at"] == 4
    assert train(_cfg(out, lr=2e-3))["resumed_at"] == 0  # another learning rate
    assert train(_cfg(out, checkpoint_every=0))["resumed_at"] == 0  # resuming off
