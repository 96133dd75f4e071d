"""Stage checkpoints: keys, digests, keyed files that survive only an exact match, and the
store-nothing mode the in-memory ``quantize`` runs with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from d4c_core.checkpoints import Checkpoints, stage_key, tensor_digest


def test_stage_key_is_sha256_of_the_json_parts() -> None:
    want = hashlib.sha256(b'"unit"\x00{"a": 1, "b": [2, 3]}\x00').hexdigest()
    assert stage_key("unit", {"b": (2, 3), "a": 1}) == want  # sorted keys, tuples as lists
    assert stage_key("a", "b") != stage_key("b", "a")
    assert stage_key("ab") != stage_key("a", "b")  # parts are separated


def test_tensor_digest_sees_values_dtype_and_shape() -> None:
    x = torch.arange(6, dtype=torch.float32)
    ref = hashlib.sha256(b"torch.float32(6,)" + x.numpy().tobytes()).hexdigest()
    assert tensor_digest(x) == ref
    assert tensor_digest(x.reshape(2, 3)) == ref  # the values in order, not the view
    assert tensor_digest(x.double()) != ref
    y = x.clone()
    y[3] = torch.nextafter(y[3], torch.tensor(4.0))  # one ulp
    assert tensor_digest(y) != ref
    assert tensor_digest(x, x) != tensor_digest(x)


def test_saved_state_comes_back_only_under_its_key(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path / "work")
    store.open("units")
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    store.save("units/0001", state, "k1")
    got = store.load("units/0001", "k1")
    assert got is not None and got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert store.load("units/0001", "k2") is None  # another key: stale, recomputed
    assert store.load("units/0002", "k1") is None  # never saved
    assert sorted(p.name for p in (tmp_path / "work" / "units").iterdir()) == ["0001.safetensors"]


def test_unreadable_checkpoint_is_discarded_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = Checkpoints(tmp_path)
    (tmp_path / "range_init.safetensors").write_bytes(b"\x00garbage")
    assert store.load("range_init", "k") is None
    assert "discarding unreadable checkpoint range_init.safetensors" in caplog.text


def test_json_side_records(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path)
    assert store.load_json("units/0000") == {}
    store.open("units")
    store.save_json("units/0000", {"mse_init": 0.5})
    assert json.loads((tmp_path / "units" / "0000.json").read_text()) == {"mse_init": 0.5}
    assert store.load_json("units/0000") == {"mse_init": 0.5}


def test_no_root_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Checkpoints(None)
    store.open("units")
    store.save("calibration", {"x": torch.zeros(2)}, "k")
    store.save_json("units/0000", {"a": 1})
    assert store.load("calibration", "k") is None
    assert store.load_json("units/0000") == {}
    assert list(tmp_path.iterdir()) == []
