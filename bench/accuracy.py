"""Accuracy benchmark: zero-shot top-1 of the quantized tiny CLIPs, by calibration method.

    python bench/accuracy.py --out bench/results/accuracy.jsonl [--jobs 2] [--device cpu]
    python bench/accuracy.py --out bench/results/accuracy.jsonl --table   # markdown only

One *cell* is (model, calibration method, bits, seed): the pipeline quantizes the built-in
model with the reference recipe at the stated budget, then the artifact is loaded back and
evaluated on the full test split of every built-in task. Cells of one (model, method, seed)
run in one work dir, so calibration (and synthesis, once it exists) is made once and reused
across bit widths — the cache key is the calibration recipe and seed, never the bits.

Results are appended to a JSONL file as each group finishes, keyed by the whole budget, so an
interrupted run continues where it stopped and a changed budget never mixes with an old one.
Real calibration images are the first ``REAL_POOL`` images of object10's *train* split written
as PNG files, so the "real" method goes through the same folder loader a user's images do.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("d4c-tiny-vit", "d4c-tiny-rn")
BITS = ("w8a8", "w6a6", "w4a8", "w4a4")
SEEDS = (0, 1, 2)
# Column order of the table: FP, the real-data upper bound, then the data-free methods. A
# method missing from the results file shows as "—" (its slot stays in the table).
COLUMNS = ("real", "noise", "bns", "pse", "d4c:pgsi", "d4c:pgsi+scg", "d4c:pgsi+pae", "d4c")
# Variants beyond the table's columns: full D4C with one Adam per mini-batch (the fix of the
# reference's shared-Adam quirk), compared against "d4c" in its own column.
VARIANTS = ("d4c/per-batch-adam",)
REAL_POOL = 1000  # a whole world.CHUNK: the split's prefix is stable


@dataclass(frozen=True)
class Budget:
    """Everything that changes a cell's result besides the cell itself."""

    images: int = 128
    recon_iters: int = 300
    synth_iters: int = 200
    test_images: int = 5000

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Group:
    """Cells sharing one calibration set: one model, one method, one seed, several bits."""

    model: str
    method: str  # a COLUMNS entry; "d4c:pgsi+scg" = D4C with those components
    seed: int
    bits: tuple[str, ...]


def calib_fields(method: str, budget: Budget) -> dict[str, Any]:
    """CalibrationRecipe fields for a table method name."""
    method, _, variant = method.partition("/")
    name, _, comps = method.partition(":")
    fields: dict[str, Any] = {"method": name, "num_images": budget.images}
    if name in ("bns", "pse", "d4c"):
        synth: dict[str, Any] = {"iters": budget.synth_iters}
        if comps:
            synth["components"] = tuple(comps.split("+"))
        if variant == "per-batch-adam":
            synth["per_batch_adam"] = True
        fields["synth"] = synth
    return fields


def real_pool(cache: Path) -> Path:
    """The object10 train images as PNG files (written once; same bytes every time)."""
    from PIL import Image

    from d4c_core.testbed.tasks import tasks
    from d4c_core.testbed.world import to_uint8

    folder = cache / f"real-object10-train-{REAL_POOL}"
    if (folder / "done").is_file():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    images, _ = tasks()["object10"].split("train", REAL_POOL)
    for i, img in enumerate(to_uint8(images)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp / f"{i:04d}.png")
    (tmp / "done").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _task_data(test_images: int) -> dict[str, tuple[Any, Any, Any]]:
    from d4c_core.testbed.tasks import tasks

    return {name: (t, *t.split("test", test_images)) for name, t in tasks().items()}


def _zero_shot_all(
    model: torch.nn.Module, tokenizer: Any, data: dict[str, Any], device: str
) -> dict[str, dict[str, float]]:
    from d4c_core.evaluate import zero_shot

    out = {}
    for name, (task, images, labels) in data.items():
        res = zero_shot(
            model, tokenizer, task.classnames, task.templates, (images.to(device), labels)
        )
        out[name] = {"top1": res["top1"], "top5": res["top5"]}
    return out


def fp_row(model_name: str, budget: Budget, device: str) -> dict[str, Any]:
    from d4c_core.models import BUILTIN_TAG, ModelSpec, load_clip

    loaded = load_clip(ModelSpec(model_name, pretrained=BUILTIN_TAG), device)
    acc = _zero_shot_all(loaded.model, loaded.tokenizer, _task_data(budget.test_images), device)
    return {"model": model_name, "method": "fp", "bits": "fp", "seed": 0, "tasks": acc}


def run_group(group: Group, budget: Budget, device: str, cache: Path) -> list[dict[str, Any]]:
    """Quantize and evaluate every bit width of one group (in a worker process)."""
    from d4c_core.artifacts import load_quantized
    from d4c_core.models import BUILTIN_TAG, ModelSpec
    from d4c_core.pipeline import JobSpec, run
    from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe, parse_bits

    spec = ModelSpec(group.model, pretrained=BUILTIN_TAG)
    calib_dir = real_pool(cache) if group.method == "real" else None
    data = _task_data(budget.test_images)
    rows = []
    with tempfile.TemporaryDirectory(prefix="d4c-acc-") as tmp:
        work = Path(tmp) / "work"  # shared by the bits: calibration is made once
        for bits in group.bits:
            w, a = parse_bits(bits)
            cal = calib_fields(group.method, budget)
            recipe = Recipe(
                seed=group.seed,
                quant=QuantRecipe(weight_bits=w, act_bits=a, recon_iters=budget.recon_iters),
                calibration=CalibrationRecipe.from_dict(cal),
            )
            out = Path(tmp) / f"out-{bits}"
            t0 = time.perf_counter()
            report = run(JobSpec(spec, recipe, calib_dir=calib_dir, device=device), work, out)
            seconds = time.perf_counter() - t0
            q = load_quantized(out, device)
            rows.append(
                {
                    "model": group.model,
                    "method": group.method,
                    "bits": bits,
                    "seed": group.seed,
                    "tasks": _zero_shot_all(q.model, q.tokenizer, data, device),
                    "embedding_cosine": report["embedding_cosine"],
                    "timings": report["timings"],
                    "seconds": seconds,
                }
            )
            shutil.rmtree(out)
    return rows


def _worker(args: tuple[Group, Budget, str, Path, int]) -> list[dict[str, Any]] | str:
    """One group's rows, or its error as text: one failing method must not stop the table."""
    group, budget, device, cache, threads = args
    torch.set_num_threads(threads)
    try:
        return run_group(group, budget, device, cache)
    except Exception as e:
        return f"{group.model} {group.method} seed {group.seed}: {type(e).__name__}: {e}"


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: that cell is simply redone
            continue
    return rows


def _cell(row: dict[str, Any]) -> tuple[str, str, str, int]:
    return row["model"], row["method"], row["bits"], row["seed"]


def fits(model: str, method: str) -> bool:
    """Whether the method applies to the model's image tower (BNS: BatchNorm; PSE: attention)."""
    from d4c_core.calibration import check_method
    from d4c_core.errors import CalibrationError

    try:
        check_method(model, method.partition("/")[0].partition(":")[0])
    except CalibrationError:
        return False
    return True


def todo_groups(
    models: Iterable[str],
    methods: Iterable[str],
    bits: tuple[str, ...],
    seeds: Iterable[int],
    done: set[tuple[str, str, str, int]],
    per_cell: bool = False,
) -> list[Group]:
    groups = []
    # Method-major: with a time limit, whole columns finish first.
    for method, model, seed in itertools.product(methods, models, seeds):
        if not fits(model, method):
            continue
        missing = tuple(b for b in bits if (model, method, b, seed) not in done)
        if per_cell:  # one process per bit width: more parallelism, calibration made per cell
            groups.extend(Group(model, method, seed, (b,)) for b in missing)
        elif missing:
            groups.append(Group(model, method, seed, missing))
    return groups


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(rows: list[dict[str, Any]], metric: str = "top1") -> list[str]:
    """Markdown: one row per (model, task, bits), one column per method, mean ± std."""
    by: dict[tuple[str, str, str, str], list[float]] = {}
    for r in rows:
        for task, acc in r["tasks"].items():
            by.setdefault((r["model"], task, r["bits"], r["method"]), []).append(acc[metric])
    models = sorted({r["model"] for r in rows}, key=lambda m: (m not in MODELS, m))
    tasks = sorted({t for r in rows for t in r["tasks"]})
    bits = [b for b in BITS if any(r["bits"] == b for r in rows)]
    bits += sorted({r["bits"] for r in rows} - set(bits) - {"fp"})
    columns = list(COLUMNS) + sorted({r["method"] for r in rows} - set(COLUMNS) - {"fp"})
    out = [
        "| model | task | FP | bits | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 4) + "|",
    ]
    for model, task in itertools.product(models, tasks):
        fp = _mean_std(by.get((model, task, "fp", "fp"), []))
        for b in bits:
            cells = [_mean_std(by.get((model, task, b, m), [])) for m in columns]
            if all(c == "—" for c in cells):
                continue
            out.append(f"| {model} | {task} | {fp} | {b.upper()} | " + " | ".join(cells) + " |")
    return out


def _git_rev() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        return "unknown"


def header(budget: Budget, device: str, argv: list[str]) -> list[str]:
    dev = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    return [
        f"Command: `python bench/accuracy.py {' '.join(argv)}` — "
        f"{datetime.date.today().isoformat()}, git {_git_rev()}, {platform.machine()} "
        f"({dev}, {device}), torch {torch.__version__}.",
        "",
        f"Budget per cell: {budget.images} calibration images, {budget.recon_iters} "
        f"reconstruction iterations per unit (reference: 20,000), synthesis "
        f"{budget.synth_iters} outer iterations where a method synthesizes (reference: 3,000), "
        f"zero-shot top-1 (%) on {budget.test_images} test images per task; mean ± std over "
        "seeds.",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="results JSONL (appended, resumed)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument(
        "--methods", default="real,noise", help=f"comma list of {', '.join(COLUMNS + VARIANTS)}"
    )
    p.add_argument("--bits", default=",".join(BITS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--images", type=int, default=Budget.images)
    p.add_argument("--recon-iters", type=int, default=Budget.recon_iters)
    p.add_argument("--synth-iters", type=int, default=Budget.synth_iters)
    p.add_argument("--test-images", type=int, default=Budget.test_images)
    p.add_argument("--jobs", type=int, default=1, help="groups run in parallel processes")
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0: cores/jobs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache")
    p.add_argument("--table", action="store_true", help="only print the table of --out")
    p.add_argument(
        "--per-cell", action="store_true", help="one task per cell, not per (model, method, seed)"
    )
    args = p.parse_args(argv)

    budget = Budget(args.images, args.recon_iters, args.synth_iters, args.test_images)
    models = [m for m in args.models.split(",") if m]
    methods = [m for m in args.methods.split(",") if m]
    bits = tuple(b for b in args.bits.split(",") if b)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    for m in methods:
        if m not in COLUMNS + VARIANTS:
            p.error(f"unknown method {m!r}; one of {', '.join(COLUMNS + VARIANTS)}")

    key = budget.key()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_results(args.out) if r.get("budget") == key]
    if not args.table:
        done = {_cell(r) for r in rows}
        with args.out.open("a") as f:
            for model in models:
                if (model, "fp", "fp", 0) not in done:
                    row = fp_row(model, budget, args.device) | {"budget": key}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    rows.append(row)
            groups = todo_groups(models, methods, bits, seeds, done, args.per_cell)
            if "real" in methods:
                real_pool(args.cache)  # once, before the workers race for it
            threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
            work = [(g, budget, args.device, args.cache, threads) for g in groups]
            failed = 0
            for new in _imap(work, args.jobs):
                if isinstance(new, str):
                    failed += 1
                    print(f"FAILED {new}", file=sys.stderr, flush=True)
                    continue
                for row in new:
                    row["budget"] = key
                    f.write(json.dumps(row) + "\n")
                    rows.append(row)
                f.flush()
                print(
                    f"done {new[0]['model']} {new[0]['method']} seed {new[0]['seed']}",
                    file=sys.stderr,
                    flush=True,
                )
    print("\n".join([*header(budget, args.device, argv), "", *table(rows)]))
    return 1 if not args.table and failed else 0


def _imap(work: list[Any], jobs: int) -> Iterator[list[dict[str, Any]] | str]:
    if jobs <= 1:
        yield from map(_worker, work)
        return
    # spawn: a forked child would inherit torch's thread pool and CUDA state.
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_worker, work)


if __name__ == "__main__":
    raise SystemExit(main())
