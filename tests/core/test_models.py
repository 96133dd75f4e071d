"""ModelSpec validation, checkpoint loading and fingerprints on the built-in tiny archs."""

from __future__ import annotations

import os
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from d4c_core.errors import CheckpointError, ModelTooLarge, SpecError, WeightsUnavailable
from d4c_core.models import (
    BUILTIN_ARCHS,
    LoadedModel,
    ModelSpec,
    check_checkpoint_file,
    check_model_size,
    count_params,
    create_architecture,
    fingerprint_state,
    list_archs,
    load_clip,
)


def random_state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = create_architecture(arch)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def vit_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = random_state("d4c-tiny-vit", seed=123)
    path = tmp_path_factory.mktemp("ckpt") / "vit.safetensors"
    save_file(state, str(path))
    return path, state


# ----------------------------------------------------------------------------- ModelSpec


def test_builtin_archs_are_registered() -> None:
    archs = list_archs()
    assert set(BUILTIN_ARCHS) <= set(archs)
    assert "RN50" in archs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"arch": "no-such-arch"}, "unknown architecture"),
        ({"arch": "../../etc/passwd"}, "unknown architecture"),
        ({"arch": "hf-hub:timm/vit_base_patch32_clip_224.openai"}, "unknown architecture"),
        ({"arch": "RN50", "pretrained": "no-such-tag"}, "unknown pretrained tag"),
        ({"arch": "d4c-tiny-vit", "pretrained": "openai"}, "unknown pretrained tag"),
        ({"arch": "RN50", "pretrained": "openai", "checkpoint": Path("x.safetensors")}, "not both"),
        ({"arch": "RN50", "pretrained": "builtin"}, "builtin"),
    ],
)
def test_model_spec_rejects(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


def test_model_spec_accepts_and_serializes() -> None:
    assert ModelSpec("RN50", pretrained="openai").to_dict() == {
        "arch": "RN50",
        "pretrained": "openai",
        "checkpoint": None,
    }
    spec = ModelSpec("d4c-tiny-rn", checkpoint=Path("/secret/dir/w.safetensors"))
    assert spec.to_dict()["checkpoint"] == "w.safetensors"  # no local path leaks
    ModelSpec("d4c-tiny-vit", pretrained="builtin")


def test_pretrained_tag_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = ModelSpec("RN50", pretrained="openai")
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="checkpoint") as info:
        load_clip(spec)
    assert time.monotonic() - t0 < 5.0
    assert "RN50/openai" in str(info.value)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- loading


def test_random_init_is_deterministic(tiny: dict[str, LoadedModel]) -> None:
    for arch in BUILTIN_ARCHS:
        again = load_clip(ModelSpec(arch))
        assert again.fingerprint == tiny[arch].fingerprint
        assert len(again.fingerprint) == 64 and int(again.fingerprint, 16) >= 0
    assert tiny["d4c-tiny-vit"].fingerprint != tiny["d4c-tiny-rn"].fingerprint


def test_loaded_model_is_eval_fp32_frozen(tiny: dict[str, LoadedModel]) -> None:
    for arch, lm in tiny.items():
        assert lm.spec.arch == arch and lm.image_size == 32
        assert not lm.model.training
        assert all(not p.requires_grad for p in lm.model.parameters())
        assert all(p.dtype == torch.float32 for p in lm.model.parameters())
        tokens = lm.tokenizer(["a photo of a cat"])
        assert tokens.shape == (1, 32)
        with torch.no_grad():
            assert lm.model.encode_text(tokens).shape == (1, 64)
            assert lm.model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_checkpoint_round_trip_reproduces_fingerprint(
    vit_ckpt: tuple[Path, dict[str, torch.Tensor]], tiny: dict[str, LoadedModel]
) -> None:
    path, state = vit_ckpt
    lm = load_clip(ModelSpec("d4c-tiny-vit", checkpoint=path))
    assert lm.fingerprint == fingerprint_state("d4c-tiny-vit", state)
    assert lm.fingerprint != tiny["d4c-tiny-vit"].fingerprint  # seed 123, not the default
    loaded = lm.model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert load_clip(ModelSpec("d4c-tiny-vit", checkpoint=path)).fingerprint == lm.fingerprint


def test_fingerprint_sees_every_byte_name_and_arch(
    vit_ckpt: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    _, state = vit_ckpt
    fp = fingerprint_state("d4c-tiny-vit", state)
    assert fingerprint_state("d4c-tiny-vit", dict(reversed(list(state.items())))) == fp
    assert fingerprint_state("d4c-tiny-rn", state) != fp

    nudged = dict(state)
    w = state["visual.conv1.weight"].clone()
    w.view(-1)[5] = torch.nextafter(w.view(-1)[5], torch.tensor(float("inf")))
    nudged["visual.conv1.weight"] = w
    assert fingerprint_state("d4c-tiny-vit", nudged) != fp

    renamed = dict(state)
    renamed["visual.conv1.weight_"] = renamed.pop("visual.conv1.weight")
    assert fingerprint_state("d4c-tiny-vit", renamed) != fp

    as_half = dict(state)
    as_half["logit_scale"] = state["logit_scale"].double()
    assert fingerprint_state("d4c-tiny-vit", as_half) != fp


# ----------------------------------------------------------------------------- bad checkpoints


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_pickle_checkpoint_is_rejected(
    tmp_path: Path, vit_ckpt: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    path = tmp_path / "model.safetensors"
    torch.save(vit_ckpt[1], path)  # a pickle/zip, whatever its name says
    with pytest.raises(CheckpointError, match="safetensors"):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=path))


@pytest.mark.parametrize(
    "kind", ["garbage", "empty", "tiny", "half", "missing_last_byte", "json_header_only"]
)
def test_corrupt_checkpoints_are_rejected(
    tmp_path: Path, vit_ckpt: tuple[Path, dict[str, torch.Tensor]], kind: str
) -> None:
    good = vit_ckpt[0].read_bytes()
    data = {
        "garbage": os.urandom(4096),
        "empty": b"",
        "tiny": good[:4],
        "half": good[: len(good) // 2],
        "missing_last_byte": good[:-1],
        "json_header_only": good[: 8 + int.from_bytes(good[:8], "little")],
    }[kind]
    path = write(tmp_path / f"{kind}.safetensors", data)
    with pytest.raises(CheckpointError):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=path))


def test_missing_checkpoint_or_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path))


def test_checkpoint_of_the_other_arch_is_rejected(
    vit_ckpt: tuple[Path, dict[str, torch.Tensor]],
) -> None:
    with pytest.raises(CheckpointError, match="missing") as info:
        load_clip(ModelSpec("d4c-tiny-rn", checkpoint=vit_ckpt[0]))
    msg = str(info.value)
    assert "does not fit" in msg and "unexpected" in msg and "shape" in msg
    assert "\n" not in msg


def test_partial_and_reshaped_checkpoints_are_rejected(
    tmp_path: Path, vit_ckpt: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    state = dict(vit_ckpt[1])
    dropped = {k: v for k, v in state.items() if k != "text_projection"}
    save_file(dropped, str(tmp_path / "dropped.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. text_projection\)"):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path / "dropped.safetensors"))

    extra = {**state, "bogus.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(e\.g\. bogus\.weight\)"):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path / "extra.safetensors"))

    reshaped = {**state, "text_projection": state["text_projection"][:, :32].contiguous()}
    save_file(reshaped, str(tmp_path / "reshaped.safetensors"))
    with pytest.raises(CheckpointError, match=r"wrong shape .*text_projection: \(64, 32\)"):
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path / "reshaped.safetensors"))


def test_open_clip_registry_sees_builtin_config() -> None:
    # The tiny archs are plain open_clip configs: open_clip itself can build them.
    list_archs()
    m = open_clip.create_model("d4c-tiny-rn", pretrained=None, load_weights=False)
    assert m.visual.image_size in (32, (32, 32))


# ----------------------------------------------------------------------------- dtypes, values, size
# Issue 13: an int8 / bool / int64 tensor of the right name and shape loaded by silent casting,
# and an all-NaN checkpoint was accepted; both must be refused naming the tensor, on the CLI's
# path (load_clip) and on the service's upload check (check_checkpoint_file) alike.

BAD_TENSOR = "visual.proj"


def _corrupt(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    t = state[BAD_TENSOR]
    bad = {
        "int8": lambda: t.to(torch.int8),
        "bool": lambda: t > 0,
        "int64": lambda: t.to(torch.int64),
        "one-nan": lambda: t.clone().index_fill_(0, torch.tensor([3]), float("nan")),
        "one-inf": lambda: t.clone().index_fill_(0, torch.tensor([0]), float("-inf")),
        "all-nan": lambda: torch.full_like(t, float("nan")),
    }[kind]()
    return {**state, BAD_TENSOR: bad.contiguous()}


@pytest.mark.parametrize("kind", ["int8", "bool", "int64", "one-nan", "one-inf", "all-nan"])
def test_non_float_or_non_finite_weights_are_rejected_naming_the_tensor(
    tmp_path: Path, vit_ckpt: tuple[Path, dict[str, torch.Tensor]], kind: str
) -> None:
    path = tmp_path / "bad.safetensors"
    save_file(_corrupt(vit_ckpt[1], kind), str(path))
    expect = "floating point" if kind in ("int8", "bool", "int64") else "NaN or Inf"
    with pytest.raises(CheckpointError, match=expect) as info:
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=path))
    assert BAD_TENSOR in str(info.value)
    with pytest.raises(CheckpointError, match=expect) as info:
        check_checkpoint_file(path, "d4c-tiny-vit", "uploaded checkpoint")
    assert BAD_TENSOR in str(info.value) and str(tmp_path) not in str(info.value)


def test_half_precision_checkpoints_pass_and_int_buffers_keep_their_dtype(
    tmp_path: Path, tiny: dict[str, LoadedModel]
) -> None:
    """Float16 / bfloat16 weights are fine (the built-in ones are fp16); BatchNorm's int64
    step counter must stay an integer, and a float one is a dtype error."""
    for dtype in (torch.float16, torch.bfloat16):
        state = {k: v.to(dtype) for k, v in tiny["d4c-tiny-vit"].model.state_dict().items()}
        save_file(state, str(tmp_path / "half.safetensors"))
        check_checkpoint_file(tmp_path / "half.safetensors", "d4c-tiny-vit")
        load_clip(ModelSpec("d4c-tiny-vit", checkpoint=tmp_path / "half.safetensors"))
    rn = {k: v.contiguous() for k, v in tiny["d4c-tiny-rn"].model.state_dict().items()}
    save_file(rn, str(tmp_path / "rn.safetensors"))
    check_checkpoint_file(tmp_path / "rn.safetensors", "d4c-tiny-rn")
    counter = next(k for k in rn if k.endswith("num_batches_tracked"))
    save_file({**rn, counter: rn[counter].float()}, str(tmp_path / "rn-f.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{counter} has dtype F32, not I64"):
        check_checkpoint_file(tmp_path / "rn-f.safetensors", "d4c-tiny-rn")


@pytest.mark.parametrize("kind", ["garbage", "pickle", "truncated", "other-arch", "missing"])
def test_the_file_check_refuses_what_the_loader_refuses_without_naming_the_path(
    tmp_path: Path, vit_ckpt: tuple[Path, dict[str, torch.Tensor]], kind: str
) -> None:
    path = tmp_path / ".upload-secret.part"
    good = vit_ckpt[0].read_bytes()
    if kind == "pickle":
        torch.save(vit_ckpt[1], path)
    elif kind != "missing":
        path.write_bytes({"garbage": os.urandom(4096), "truncated": good[:-1]}.get(kind, good))
    arch = "d4c-tiny-rn" if kind == "other-arch" else "d4c-tiny-vit"
    with pytest.raises(CheckpointError) as info:
        check_checkpoint_file(path, arch, "uploaded checkpoint")
    msg = str(info.value)
    assert msg.startswith("uploaded checkpoint") and "\n" not in msg
    assert str(tmp_path) not in msg and "secret" not in msg
    if kind == "other-arch":
        assert "does not fit the architecture" in msg


def test_param_count_is_taken_on_the_meta_device(tiny: dict[str, LoadedModel]) -> None:
    for arch, lm in tiny.items():
        assert count_params(arch) == sum(p.numel() for p in lm.model.parameters())
    check_model_size("d4c-tiny-rn", None)  # no budget: no check
    check_model_size("d4c-tiny-rn", count_params("d4c-tiny-rn"))
    with pytest.raises(ModelTooLarge, match=r"d4c-tiny-rn has 5,018,969 parameters"):
        check_model_size("d4c-tiny-rn", 5_000_000)
