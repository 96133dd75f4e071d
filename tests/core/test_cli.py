"""``d4c`` command line: quantize / eval / inspect, their outputs and every way they refuse.

Most cases call ``d4c_core.cli.main`` in-process (it returns the exit status); one runs the
real ``python -m d4c_core.cli`` entry and the resume test kills a real subprocess. Full
quantize runs cost ~15 s each on a tiny model (range init dominates), so there are only three
happy ones (one per module fixture, plus the resume): every other test reuses their OUT dirs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from d4c_core.artifacts import load_quantized
from d4c_core.cli import main
from d4c_core.evaluate import zero_shot
from d4c_core.models import BUILTIN_TAG, WEIGHTS_DIR, LoadedModel, ModelSpec, load_clip
from d4c_core.recipe import Recipe

FAST = ["--recon-iters", "2", "--images", "8"]
# The tiny-vit artifact of the module fixture; the resume test reruns exactly these arguments
# (hence 5 iterations, not 2), so that artifact doubles as the uninterrupted reference.
VIT_ARGS = ["--model", "d4c-tiny-vit", "--bits", "w4a8", "--recon-iters", "5", "--images", "8"]
PROGRESS = re.compile(r"^\[\s*(\d+\.\d)%\] (\w+)$")
CLASSES = ("cat", "dog", "bird")  # "bird" has no folder: a subset of classes is allowed


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models with 2 intra-op threads on a busy 2-core box run range init >10x slower
    (thread barriers wait for a time slice); one thread keeps these runs ~15 s. Restored after.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# --------------------------------------------------------------------------- helpers


@dataclass
class Run:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Run:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return Run(code, cap.out, cap.err)


def cli_captured(*argv: str | Path) -> Run:
    """``cli`` for module-scoped fixtures, where capsys is not available."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return Run(code, out.getvalue(), err.getvalue())


def error_line(run: Run | tuple[int, str], *needles: str) -> str:
    """Exit status 2, exactly one ``error: ...`` line and it is the last; no traceback."""
    code, err = (run.code, run.err) if isinstance(run, Run) else run
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), errors[0]
    return errors[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not (out.parent / f".{out.name}.tmp").exists()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_pngs(folder: Path, n: int, seed: int, size: int = 40) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def state_for_file(loaded: LoadedModel, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A model's state dict as safetensors accepts it: own, contiguous storage per tensor."""
    out = {}
    for k, v in loaded.model.state_dict().items():
        t = v.detach().clone().contiguous()
        out[k] = t * scale if t.is_floating_point() else t
    return out


# --------------------------------------------------------------------------- module fixtures


@dataclass
class Quantized:
    out: Path
    run: Run
    work_left: bool


@pytest.fixture(scope="module")
def vit_q(tmp_path_factory: pytest.TempPathFactory) -> Quantized:
    """``d4c quantize`` of d4c-tiny-vit, noise calibration, default work dir, pretty JSON."""
    out = tmp_path_factory.mktemp("vit") / "OUT"
    run = cli_captured("quantize", *VIT_ARGS, "--out", out)
    return Quantized(out, run, (out.parent / ".OUT.work").exists())


@pytest.fixture(scope="module")
def rn_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid d4c-tiny-rn safetensors checkpoint whose weights differ from random init."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rn.safetensors"
    save_file(state_for_file(load_clip(ModelSpec("d4c-tiny-rn")), scale=1.01), str(path))
    return path


@pytest.fixture(scope="module")
def rn_q(tmp_path_factory: pytest.TempPathFactory, rn_ckpt: Path) -> Quantized:
    """d4c-tiny-rn from ``--checkpoint`` with ``--calib real`` (one run covers both options)."""
    root = tmp_path_factory.mktemp("rn")
    write_pngs(root / "calib" / "sub", 10, seed=1)  # nested: the folder is searched recursively
    out = root / "OUT"
    run = cli_captured(
        "quantize", "--model", "d4c-tiny-rn", "--checkpoint", rn_ckpt, *FAST,
        "--calib", "real", "--calib-dir", root / "calib", "--json", "--out", out,
    )  # fmt: skip
    return Quantized(out, run, (root / ".OUT.work").exists())


@dataclass
class EvalFiles:
    classnames: Path
    templates: Path
    images: Path


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> EvalFiles:
    root = tmp_path_factory.mktemp("eval")
    for i, c in enumerate(CLASSES[:2]):
        write_pngs(root / "imgs" / c, 3, seed=10 + i)
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("a photo of a {c}.\n")
    return EvalFiles(root / "classnames.txt", root / "templates.txt", root / "imgs")


def eval_args(f: EvalFiles) -> list[str | Path]:
    return ["--classnames", f.classnames, "--templates", f.templates, "--images-dir", f.images]


def reference_zero_shot(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    preprocess: Callable[[Image.Image], torch.Tensor],
    f: EvalFiles,
) -> dict[str, Any]:
    """The same score computed without the CLI's file/folder readers."""
    xs, ys = [], []
    for label, c in enumerate(CLASSES):
        for p in sorted((f.images / c).glob("*.png")) if (f.images / c).is_dir() else []:
            with Image.open(p) as im:
                xs.append(preprocess(im.convert("RGB")))
            ys.append(label)
    data = (torch.stack(xs), torch.tensor(ys))
    return zero_shot(model, tokenizer, list(CLASSES), ["a photo of a {c}."], data)


# --------------------------------------------------------------------------- quantize: happy


def test_quantize_writes_artifact(vit_q: Quantized) -> None:
    assert vit_q.run.code == 0, vit_q.run.err
    names = {p.name for p in vit_q.out.iterdir()}
    assert names == {"model.safetensors", "manifest.json", "report.json", "calibration.png"}
    summary = json.loads(vit_q.run.out)
    assert summary["out"] == str(vit_q.out)
    assert set(summary["timings"]) >= {"load", "range_init", "reconstruction", "export"}
    assert 0.0 < summary["metrics"]["embedding_cosine"]["image"] <= 1.0 + 1e-9
    assert not vit_q.work_left, "the work dir must be removed after success"
    assert not (vit_q.out.parent / ".OUT.tmp").exists()

    err = vit_q.run.err.strip().splitlines()
    # No weight flag: the shipped built-in weights if there are any, else random init + a note.
    tag = BUILTIN_TAG if (WEIGHTS_DIR / "d4c-tiny-vit.safetensors").is_file() else None
    if tag is None:
        assert err.pop(0).startswith("note: no built-in weights for d4c-tiny-vit")
    progress = [PROGRESS.match(line) for line in err]
    assert all(progress), err
    stages = [m[2] for m in progress if m]
    fracs = [float(m[1]) for m in progress if m]
    assert stages[0] == "load" and stages[-1] == "export" and fracs[-1] == 100.0
    assert "reconstruction" in stages and fracs == sorted(fracs)

    manifest = json.loads((vit_q.out / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "d4c-tiny-vit"
    assert manifest["model"]["pretrained"] == tag
    assert manifest["recipe"]["quant"]["recon_iters"] == 5
    assert manifest["recipe"]["calibration"]["num_images"] == 8


def test_inspect_ok_then_corrupted(
    vit_q: Quantized, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = cli(capsys, "inspect", vit_q.out)
    assert run.code == 0, run.err
    info = json.loads(run.out)
    assert info["checksums"] == "ok"
    assert info["arch"] == "d4c-tiny-vit"
    # W4 layers + the 8-bit token table; the whole file within the 0.30x of FP32.
    assert 0 < info["weights"]["ratio"] < 0.3
    assert info["weights"]["file_ratio"] <= 0.30

    copy = tmp_path / "copy"
    shutil.copytree(vit_q.out, copy)
    model = copy / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    run = cli(capsys, "inspect", copy)
    error_line(run, "model.safetensors", "checksum")
    assert run.out == ""


def test_inspect_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The path as given, and what is wrong with it (not a bare "nope: no manifest.json").
    error_line(cli(capsys, "inspect", tmp_path / "nope"), str(tmp_path / "nope"), "no such dir")
    (tmp_path / "empty").mkdir()
    error_line(cli(capsys, "inspect", tmp_path / "empty"), "not a d4c artifact", "manifest.json")


def test_entry_point_subprocess(vit_q: Quantized) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "d4c_core.cli", "inspect", str(vit_q.out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["checksums"] == "ok"
    p = subprocess.run([*cmd, "--bogus"], capture_output=True, text=True, env=env, timeout=120)
    error_line((p.returncode, p.stderr), "--bogus")


def test_checkpoint_and_real_calibration(rn_q: Quantized, rn_ckpt: Path) -> None:
    assert rn_q.run.code == 0, rn_q.run.err
    assert not rn_q.work_left
    assert "note:" not in rn_q.run.err  # weights came from the checkpoint
    assert len(rn_q.run.out.strip().splitlines()) == 1  # --json: one line
    assert json.loads(rn_q.run.out)["out"] == str(rn_q.out)
    manifest = json.loads((rn_q.out / "manifest.json").read_text())
    assert manifest["model"]["checkpoint"] == rn_ckpt.name
    assert manifest["recipe"]["calibration"]["method"] == "real"
    expected = load_clip(ModelSpec("d4c-tiny-rn", checkpoint=rn_ckpt)).fingerprint
    assert manifest["model"]["fingerprint"] == expected
    assert expected != load_clip(ModelSpec("d4c-tiny-rn")).fingerprint  # not random init
    q = load_quantized(rn_q.out)
    assert q.manifest["model"]["arch"] == "d4c-tiny-rn"


# --------------------------------------------------------------------------- quantize: errors


def test_calib_real_without_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "OUT"
    run = cli(capsys, "quantize", "--model", "d4c-tiny-vit", *FAST, "--calib", "real", "--out", out)
    error_line(run, "--calib-dir")
    assert_nothing_written(out)
    assert not (tmp_path / ".OUT.work").exists()


def test_calib_dir_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "OUT"
    run = cli(
        capsys, "quantize", "--model", "d4c-tiny-vit", *FAST,
        "--calib", "real", "--calib-dir", tmp_path / "nope", "--out", out,
    )  # fmt: skip
    error_line(run, "not a directory")
    assert_nothing_written(out)


def test_calib_dir_too_few_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_pngs(tmp_path / "calib", 3, seed=2)
    out = tmp_path / "OUT"
    run = cli(
        capsys, "quantize", "--model", "d4c-tiny-vit", "--random-init", *FAST,
        "--calib", "real", "--calib-dir", tmp_path / "calib", "--out", out,
    )  # fmt: skip
    error_line(run, "3 images, 8 requested")
    assert_nothing_written(out)


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--model", "no-such-arch"], ["unknown architecture", "no-such-arch"]),
        (["--model", "d4c-tiny-vit", "--bits", "w9a8"], ["weight bits 9", "2..8"]),
        (["--model", "d4c-tiny-vit", "--bits", "w1a8"], ["weight bits 1"]),
        (["--model", "d4c-tiny-vit", "--bits", "w4a9"], ["activation bits 9"]),
        (["--model", "d4c-tiny-vit", "--bits", "w4"], ["'w4'", "wXaY"]),
        (["--model", "d4c-tiny-vit", "--images", "0"], ["num_images"]),
        (["--model", "d4c-tiny-vit", "--recon-iters", "-1"], ["recon_iters"]),
        (["--model", "RN50", "--pretrained", "no-such-tag"], ["unknown pretrained tag"]),
        (["--model", "RN50"], ["--pretrained", "--checkpoint", "--random-init"]),
        (["--model", "RN50", "--pretrained", "builtin"], ["'builtin'"]),
    ],
    ids=[
        "unknown-arch", "w9a8", "w1a8", "w4a9", "malformed-w4", "zero-images",
        "negative-iters", "unknown-tag", "no-weights-source", "builtin-non-tiny",
    ],
)  # fmt: skip
def test_quantize_refuses_spec(
    extra: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "OUT"
    t0 = time.perf_counter()
    run = cli(capsys, "quantize", *extra, "--out", out)
    error_line(run, *needles)
    assert time.perf_counter() - t0 < 30  # refused up front, before any model work
    assert_nothing_written(out)
    assert not (tmp_path / ".OUT.work").exists()
    assert run.out == ""


@pytest.mark.parametrize("case", ["out-dir", "out-file", "workdir"])
def test_quantize_refuses_foreign_paths(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """OUT is replaced and the work dir deleted on success: a path holding anything else
    (a user's folder, a file, ``--out .``) is refused up front and left untouched."""
    out, work = tmp_path / "OUT", tmp_path / "W"
    victim = (work if case == "workdir" else out) / "precious.txt"
    if case == "out-file":
        victim = out
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("keep me")
    run = cli(capsys, "quantize", "--model", "d4c-tiny-vit", *FAST, "--out", out, "--workdir", work)
    error_line(run, "--workdir" if case == "workdir" else "--out", "refusing to replace")
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["W" if case == "workdir" else "OUT"]


def test_quantize_refuses_out_dot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    error_line(cli(capsys, "quantize", "--model", "d4c-tiny-vit", *FAST, "--out", "."), "--out")
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_pretrained_tag_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "OUT"
    t0 = time.perf_counter()
    run = cli(capsys, "quantize", "--model", "RN50", "--pretrained", "openai", *FAST, "--out", out)
    line = error_line(run, "RN50/openai", "--checkpoint", "HF_HUB_OFFLINE")
    assert "checkpoint" in line
    assert time.perf_counter() - t0 < 60  # no network retries
    assert_nothing_written(out)


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    """Checkpoints d4c-tiny-rn must refuse, by kind."""
    rn = load_clip(ModelSpec("d4c-tiny-rn"))
    vit = load_clip(ModelSpec("d4c-tiny-vit"))
    paths = {k: folder / f"{k}.safetensors" for k in ("pickle", "garbage", "truncated", "other")}
    torch.save(rn.model.state_dict(), paths["pickle"])
    paths["garbage"].write_bytes(bytes(range(256)) * 64)
    save_file(state_for_file(rn), str(paths["truncated"]))
    blob = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(blob[: len(blob) // 2])
    save_file(state_for_file(vit), str(paths["other"]))
    return paths


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _bad_checkpoints(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize(
    ("kind", "needles"),
    [
        ("pickle", ["not a valid safetensors file"]),
        ("garbage", ["not a valid safetensors file"]),
        ("truncated", ["not a valid safetensors file"]),
        ("other", ["does not fit the architecture"]),
        ("absent", ["does not exist"]),
    ],
)
def test_quantize_refuses_checkpoint(
    kind: str,
    needles: list[str],
    bad_checkpoints: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = bad_checkpoints.get(kind, tmp_path / "absent.safetensors")
    out = tmp_path / "OUT"
    run = cli(
        capsys, "quantize", "--model", "d4c-tiny-rn", "--checkpoint", ckpt, *FAST, "--out", out
    )
    line = error_line(run, *needles)
    assert ckpt.name in line
    assert run.err.strip().splitlines() == [line]  # refused before any progress line
    assert_nothing_written(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_gpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "OUT"
    run = cli(
        capsys, "quantize", "--model", "d4c-tiny-vit", *FAST, "--device", "cuda", "--out", out
    )
    error_line(run, "--device cuda", "no CUDA")
    assert_nothing_written(out)
    assert not (tmp_path / ".OUT.work").exists()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "required"),
        (["quantize", "--model", "d4c-tiny-vit"], "--out"),
        (["quantize", "--out", "X"], "--model"),
        (["quantize", "--model", "d4c-tiny-vit", "--out", "X", "--images", "abc"], "--images"),
        (["quantize", "--model", "d4c-tiny-vit", "--out", "X", "--calib", "imagenet"], "--calib"),
        (["quantize", "--model", "d4c-tiny-vit", "--out", "X", "--device", "tpu"], "--device"),
        (["quantize", "--model", "RN50", "--out", "X", "--random-init", "--pretrained", "openai"],
         "not allowed with"),
        (["frobnicate"], "frobnicate"),
        (["inspect"], "out"),
    ],
    ids=[
        "no-command", "missing-out", "missing-model", "images-not-int", "bad-calib",
        "bad-device", "exclusive-sources", "unknown-command", "inspect-no-dir",
    ],
)  # fmt: skip
def test_usage_errors(
    argv: list[str],
    needle: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # "X" must never appear anywhere real
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line: no usage dump
    error_line((2, err), needle)
    assert not (tmp_path / "X").exists()


# --------------------------------------------------------------------------- eval


def test_eval_fp_matches_library(
    eval_files: EvalFiles, tiny: dict[str, LoadedModel], capsys: pytest.CaptureFixture[str]
) -> None:
    run = cli(capsys, "eval", "--model", "d4c-tiny-vit", "--random-init", *eval_args(eval_files))
    assert run.code == 0, run.err
    res = json.loads(run.out)
    assert res["n"] == 6
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0
    lm = tiny["d4c-tiny-vit"]
    assert res == reference_zero_shot(lm.model, lm.tokenizer, lm.preprocess, eval_files)


def test_eval_quantized(
    vit_q: Quantized, eval_files: EvalFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", "d4c-tiny-vit", "--quantized", vit_q.out, *eval_args(eval_files)]
    run = cli(capsys, *args)
    assert run.code == 0, run.err
    res = json.loads(run.out)
    assert res["n"] == 6
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0
    q = load_quantized(vit_q.out)
    assert res == reference_zero_shot(q.model, q.tokenizer, q.preprocess, eval_files)


@pytest.mark.parametrize("case", ["no-classnames", "no-placeholder", "stray-folder", "empty"])
def test_eval_refuses_inputs(
    case: str, eval_files: EvalFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = eval_args(eval_files)
    if case == "no-classnames":
        args[1], needle = tmp_path / "missing.txt", "does not exist"
    elif case == "no-placeholder":
        (tmp_path / "t.txt").write_text("a photo of a {c}.\na photo of a thing.\n")
        args[3], needle = tmp_path / "t.txt", "has no '{c}'"
    elif case == "stray-folder":
        shutil.copytree(eval_files.images, tmp_path / "imgs")
        write_pngs(tmp_path / "imgs" / "zebra", 1, seed=3)
        args[5], needle = tmp_path / "imgs", "not class names: zebra"
    else:
        (tmp_path / "imgs").mkdir()
        args[5], needle = tmp_path / "imgs", "no images"
    error_line(cli(capsys, "eval", "--model", "d4c-tiny-vit", "--random-init", *args), needle)


def test_eval_quantized_other_arch(
    vit_q: Quantized, eval_files: EvalFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["eval", "--model", "d4c-tiny-rn", "--quantized", vit_q.out, *eval_args(eval_files)]
    error_line(cli(capsys, *args), "holds d4c-tiny-vit", "not d4c-tiny-rn")


def test_eval_missing_flag(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = cli(capsys, "eval", "--model", "d4c-tiny-vit", "--random-init", "--classnames", tmp_path)
    error_line(run, "--templates is required")


# --------------------------------------------------------------------------- resume


def test_resume_after_kill(vit_q: Quantized, tmp_path: Path) -> None:
    """SIGKILL mid-reconstruction, rerun: finished units are reused and OUT's model file is
    byte-identical to the uninterrupted run of the same arguments (``vit_q``, default work
    dir, other process)."""
    assert vit_q.run.code == 0
    out, work = tmp_path / "OUT", tmp_path / "W"
    argv = ["quantize", *VIT_ARGS, "--out", str(out), "--workdir", str(work)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "d4c_core.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(300, proc.kill)  # never hang the suite
    watchdog.start()
    killed_at = None
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            m = PROGRESS.match(line.strip())
            if m and m[2] == "reconstruction" and float(m[1]) > 20.0:
                proc.send_signal(signal.SIGKILL)
                killed_at = float(m[1])
                break
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert killed_at is not None, "".join(seen)
    assert proc.returncode == -signal.SIGKILL
    assert_nothing_written(out)
    done = sorted((work / "units").glob("*.safetensors"))
    assert done, "no reconstruction unit was checkpointed before the kill"
    assert (work / "range_init.safetensors").is_file()

    run = cli_captured(*argv)
    assert run.code == 0, run.err
    report = json.loads((out / "report.json").read_text())
    flags = [u.get("resumed", False) for u in report["units"]]
    assert report["resumed_units"] >= len(done) > 0, (flags, [d.name for d in done])
    assert report["resumed_units"] < len(report["units"])  # the kill did stop it midway
    assert not work.exists()
    ref = vit_q.out / "model.safetensors"
    assert sha256(out / "model.safetensors") == sha256(ref)


# --------------------------------------------------------------------------- synthesis (issue 4)


@pytest.mark.slow  # ~15 s idle, ~50 s on a busy 2-core box (range init dominates)
def test_quantize_d4c_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "OUT"
    run = cli(
        capsys, "quantize", "--model", "d4c-tiny-rn", "--bits", "w4a8", "--calib", "d4c",
        "--synth-iters", "2", "--images", "8", "--recon-iters", "2", "--out", out,
    )  # fmt: skip
    assert run.code == 0, run.err
    assert (out / "calibration.png").is_file()
    recipe = json.loads((out / "manifest.json").read_text())["recipe"]["calibration"]
    assert recipe["method"] == "d4c"
    assert recipe["synth"]["iters"] == 2 and recipe["synth"]["components"] == ["pgsi", "scg", "pae"]
    # 2 synthesis steps (8 images, batch 16, 2 outer iterations): progress inside the stage.
    stages = [m.group(2) for m in map(PROGRESS.match, run.err.splitlines()) if m]
    assert stages.count("calibration") >= 3


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--model", "d4c-tiny-vit", "--calib", "bns"], ["'bns' needs BatchNorm", "d4c-tiny-vit"]),
        (["--model", "d4c-tiny-rn", "--calib", "pse"], ["'pse' needs attention", "d4c-tiny-rn"]),
        (["--model", "ViT-B-32", "--random-init", "--calib", "bns"], ["'bns'", "ViT-B-32"]),
        (["--model", "d4c-tiny-vit", "--synth-iters", "3"], ["--synth-iters", "not noise"]),
        (["--model", "d4c-tiny-vit", "--calib", "real", "--per-batch-adam"], ["--per-batch-adam"]),
        (["--model", "d4c-tiny-rn", "--calib", "bns", "--d4c-components", "pgsi"],
         ["--d4c-components", "only for method d4c, not bns"]),
        (["--model", "d4c-tiny-vit", "--calib", "d4c", "--d4c-components", "scg,pae"],
         ["not a valid ablation", "pgsi,scg,pae"]),
        (["--model", "d4c-tiny-vit", "--calib", "d4c", "--synth-batch", "0"], ["batch"]),
        (["--model", "d4c-tiny-vit", "--calib", "d4c", "--prompts", "/no/such/file"],
         ["does not exist"]),
    ],
    ids=[
        "bns-on-vit", "pse-on-rn", "bns-on-real-vit", "synth-flag-with-noise",
        "adam-flag-with-real", "components-with-bns", "bad-ablation", "zero-batch",
        "missing-prompts",
    ],
)  # fmt: skip
def test_quantize_refuses_synthesis_combos(
    extra: list[str], needles: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "OUT"
    error_line(cli(capsys, "quantize", *extra, *FAST, "--out", out), *needles)
    assert_nothing_written(out)


def test_quantize_prompt_files_reach_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--prompts / --prompt-templates become the recipe's prompt set (checked before running)."""
    import d4c_core.pipeline

    (tmp_path / "names.txt").write_text("oval\n\nletter T \n")
    (tmp_path / "templates.txt").write_text("a drawing of a {c}.\n")
    seen: list[Any] = []

    def fake_run(job: Any, *a: Any, **k: Any) -> dict[str, Any]:
        seen.append(job.recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(d4c_core.pipeline, "run", fake_run)
    code = main([
        "quantize", "--model", "d4c-tiny-vit", *FAST, "--calib", "d4c", "--synth-iters", "1",
        "--d4c-components", "pae,pgsi", "--per-batch-adam", "--synth-batch", "4",
        "--prompts", str(tmp_path / "names.txt"),
        "--prompt-templates", str(tmp_path / "templates.txt"), "--out", str(tmp_path / "OUT"),
    ])  # fmt: skip
    assert code == 130
    cal = seen[0].calibration
    assert cal.classnames == ("oval", "letter T") and cal.templates == ("a drawing of a {c}.",)
    assert (cal.synth.iters, cal.synth.batch, cal.synth.per_batch_adam) == (1, 4, True)
    assert cal.synth.components == ("pgsi", "pae")


# ------------------------------------------------------- what a new user tripped over


def test_quantize_help_shows_every_recipe_default(capsys: pytest.CaptureFixture[str]) -> None:
    """The flags come from the recipe's declarations, each with its default."""
    from d4c_core.recipe import Recipe
    from d4c_core.recipe_cli import recipe_flags

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in (
        "--bits",
        "default: w4a8",
        "--calib",
        "default: noise",
        "--images",
        "default: 128",
        "--seed",
        "default: 0",
        "--device",
        "default: cpu",
    ):
        assert needle in text, needle
    flags = recipe_flags()
    assert len({f.flags[0] for f in flags}) == len(flags)  # one flag per field, no clash
    defaults = Recipe()
    assert f"default: {defaults.quant.recon_iters}; recipe: quant.recon_iters" in text
    assert "recipe: calibration.synth.kde_points" in text  # even the deepest field


def test_unknown_model_names_the_builtins_and_a_close_match(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = cli(capsys, "quantize", "--model", "ViT-B-33", *FAST, "--out", tmp_path / "OUT")
    line = error_line(run, "d4c-tiny-vit", "d4c-tiny-rn", "d4c models", "ViT-B-32")
    assert "open_clip.list_models" not in line
    listing = cli(capsys, "models", "--json")
    rows = json.loads(listing.out)
    assert rows[0] == {"arch": "d4c-tiny-rn", "builtin": True} and len(rows) > 100


def test_existing_artifact_is_replaced_only_with_overwrite(
    vit_q: Quantized, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "OUT"
    shutil.copytree(vit_q.out, out)
    before = (out / "manifest.json").read_bytes()
    run = cli(capsys, "quantize", *VIT_ARGS, "--out", out)
    error_line(run, "--overwrite")
    assert (out / "manifest.json").read_bytes() == before


def test_recipe_file_and_flags_make_one_recipe(
    vit_q: Quantized, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--recipe takes a manifest (its recipe reproduces the job); flags override its fields."""
    import d4c_core.pipeline

    seen: list[Any] = []

    def fake_run(job: Any, *a: Any, **k: Any) -> dict[str, Any]:
        seen.append(job.recipe)
        raise KeyboardInterrupt

    monkeypatch.setattr(d4c_core.pipeline, "run", fake_run)
    manifest = vit_q.out / "manifest.json"
    base = json.loads(manifest.read_text())["recipe"]
    main(
        [
            "quantize",
            "--model",
            "d4c-tiny-vit",
            "--recipe",
            str(manifest),
            "--out",
            str(tmp_path / "A"),
        ]
    )
    main(
        [
            "quantize",
            "--model",
            "d4c-tiny-vit",
            "--recipe",
            str(manifest),
            "--seed",
            "9",
            "--out",
            str(tmp_path / "B"),
        ]
    )
    assert seen[0].to_dict() == Recipe.from_dict(base).to_dict()
    assert seen[1].seed == 9 and seen[1].replace(seed=base["seed"]) == seen[0]
