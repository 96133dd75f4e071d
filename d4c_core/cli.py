"""``d4c``: the command line MLOps scripts call. Thin: parses, calls the library, prints.

Every bad input ends as one ``error: ...`` line on stderr and exit status 2; nothing is
written to OUT unless the whole job succeeded (the pipeline renames a finished temp dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from d4c_core.errors import D4CError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _model_spec(args: argparse.Namespace) -> Any:
    from d4c_core.models import BUILTIN_ARCHS, BUILTIN_TAG, WEIGHTS_DIR, ModelSpec

    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    pretrained = args.pretrained
    ModelSpec(args.model)  # unknown architecture is the first thing to report
    if pretrained is None and checkpoint is None and not args.random_init:
        if args.model in BUILTIN_ARCHS:
            if (WEIGHTS_DIR / f"{args.model}.safetensors").is_file():
                pretrained = BUILTIN_TAG
            else:
                print(
                    f"note: no built-in weights for {args.model}; using random init",
                    file=sys.stderr,
                )
        else:
            raise D4CError(
                f"{args.model}: give --pretrained TAG, --checkpoint F.safetensors or --random-init"
            )
    return ModelSpec(args.model, pretrained=pretrained, checkpoint=checkpoint)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="open_clip architecture, e.g. d4c-tiny-vit, ViT-B-32"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pretrained", help="open_clip pretrained tag (or 'builtin')")
    src.add_argument("--checkpoint", help="local safetensors checkpoint of the architecture")
    src.add_argument("--random-init", action="store_true", help="random weights (timing, tests)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def cmd_quantize(args: argparse.Namespace) -> int:
    from d4c_core.pipeline import JobSpec, run
    from d4c_core.recipe import QuantRecipe, Recipe, parse_bits

    w, a = parse_bits(args.bits)
    quant: dict[str, Any] = {"weight_bits": w, "act_bits": a}
    if args.recon_iters is not None:
        quant["recon_iters"] = args.recon_iters
    recipe = Recipe(
        seed=args.seed,
        quant=QuantRecipe(**quant),
        calibration=_calibration_recipe(args),
    )
    calib_dir = Path(args.calib_dir) if args.calib_dir else None
    if args.calib == "real" and calib_dir is None:
        raise D4CError("--calib real needs --calib-dir DIR")
    if calib_dir is not None and not calib_dir.is_dir():
        raise D4CError(f"--calib-dir {calib_dir} is not a directory")
    _check_cuda(args.device)
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out.parent / f".{out.name}.work"
    # Both are deleted on success (OUT replaced, work dir cleaned up): never someone's data.
    _check_replaceable(out, "--out", "manifest.json", "artifact")
    _check_replaceable(work, "--workdir", "units", "work dir")
    eval_task = _eval_task(args.task) if args.task else None
    job = JobSpec(
        _model_spec(args), recipe, calib_dir=calib_dir, eval_task=eval_task, device=args.device
    )

    def progress(stage: str, frac: float) -> None:
        if not args.quiet:
            print(f"[{frac * 100:5.1f}%] {stage}", file=sys.stderr, flush=True)

    report = run(job, work, out, on_progress=progress)
    shutil.rmtree(work, ignore_errors=True)  # finished: nothing left to resume
    summary = {"out": str(out), "timings": report["timings"], "metrics": report["metrics"]}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


def _calibration_recipe(args: argparse.Namespace) -> Any:
    """The calibration part of the recipe; synthesis flags only go with a synthesizing method."""
    from d4c_core.calibration import check_method
    from d4c_core.evaluate import read_lines
    from d4c_core.recipe import CalibrationRecipe, SynthRecipe

    synth: dict[str, Any] = {}
    if args.synth_iters is not None:
        synth["iters"] = args.synth_iters
    if args.synth_batch is not None:
        synth["batch"] = args.synth_batch
    if args.per_batch_adam:
        synth["per_batch_adam"] = True
    if args.d4c_components is not None:
        if args.calib != "d4c":
            raise D4CError("--d4c-components needs --calib d4c")
        synth["components"] = tuple(c.strip() for c in args.d4c_components.split(",") if c.strip())
    if synth and args.calib not in SYNTH_METHODS:
        flags = ", ".join(sorted(SYNTH_FLAGS[k] for k in synth))
        raise D4CError(f"{flags}: only for --calib {'|'.join(SYNTH_METHODS)}, not {args.calib}")
    check_method(args.model, args.calib)
    names = tuple(read_lines(Path(args.prompts))) if args.prompts else ()
    templates = tuple(read_lines(Path(args.prompt_templates))) if args.prompt_templates else ()
    return CalibrationRecipe(
        method=args.calib,
        num_images=args.images,
        classnames=names,
        templates=templates,
        synth=SynthRecipe(**synth),
    )


SYNTH_METHODS = ("bns", "pse", "d4c")
SYNTH_FLAGS = {
    "iters": "--synth-iters",
    "batch": "--synth-batch",
    "per_batch_adam": "--per-batch-adam",
    "components": "--d4c-components",
}


def _check_replaceable(path: Path, flag: str, marker: str, what: str) -> None:
    """Refuse a path that exists and is neither empty nor ours (no ``marker`` inside)."""
    if not path.exists() or (path / marker).exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise D4CError(f"{flag} {path} exists and is not a d4c {what}; refusing to replace it")


def _testbed_task(name: str) -> Any:
    from d4c_core.testbed.tasks import tasks

    found = tasks().get(name)
    if found is None:
        raise D4CError(f"unknown task {name!r}; see `d4c tasks` ({', '.join(tasks())})")
    return found


def _eval_task(name: str) -> Any:
    """A built-in zero-shot task's full test split, as the pipeline evaluates it."""
    from d4c_core.pipeline import EvalTask

    task = _testbed_task(name)
    images, labels = task.split("test")
    return EvalTask(task.name, task.classnames, task.templates, images, labels)


def cmd_tasks(args: argparse.Namespace) -> int:
    from d4c_core.testbed.tasks import SPLIT_SIZES, tasks

    rows = [
        {
            "name": t.name,
            "classes": len(t.classnames),
            "classnames": list(t.classnames),
            "templates": list(t.templates),
            "test_images": SPLIT_SIZES["test"],
        }
        for t in tasks().values()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['name']}: {r['classes']} classes, {len(r['templates'])} templates")
    return 0


def _check_cuda(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise D4CError("--device cuda: no CUDA device is available here")


def cmd_eval(args: argparse.Namespace) -> int:
    from d4c_core.evaluate import zero_shot_folder
    from d4c_core.models import load_clip

    folder = (args.classnames, args.templates, args.images_dir)
    if args.task and any(folder):
        raise D4CError("give --task or --classnames/--templates/--images-dir, not both")
    if not args.task:
        for flag in ("classnames", "templates", "images_dir"):
            if getattr(args, flag) is None:
                raise D4CError(f"--{flag.replace('_', '-')} is required (or --task NAME)")
    task = _eval_task(args.task) if args.task else None
    _check_cuda(args.device)
    if args.quantized:
        from d4c_core.artifacts import load_quantized

        q = load_quantized(Path(args.quantized), args.device)
        model, tokenizer, preprocess = q.model, q.tokenizer, q.preprocess
        if q.manifest["model"]["arch"] != args.model:
            raise D4CError(
                f"{args.quantized} holds {q.manifest['model']['arch']}, not {args.model}"
            )
    else:
        lm = load_clip(_model_spec(args), args.device)
        model, tokenizer, preprocess = lm.model, lm.tokenizer, lm.preprocess
    if task is not None:
        from d4c_core.evaluate import zero_shot

        data = (task.images.to(args.device), task.labels.to(args.device))
        res = zero_shot(model, tokenizer, task.classnames, task.templates, data)
        res = {"task": task.name} | res
    else:
        res = zero_shot_folder(
            model,
            tokenizer,
            preprocess,
            Path(args.classnames),
            Path(args.templates),
            Path(args.images_dir),
        )
    print(json.dumps(res))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from d4c_core.artifacts import inspect

    print(json.dumps(inspect(Path(args.out)), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="d4c", description="Data-free quantization of CLIP models (D4C).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a CLIP and write an artifact directory")
    _add_model_args(q)
    q.add_argument("--bits", default="w4a8", help="wXaY, X and Y in 2..8 (w4a8, w6a6, w8a8)")
    q.add_argument("--calib", default="noise", choices=["noise", "real", "bns", "pse", "d4c"])
    q.add_argument("--calib-dir", help="folder of real calibration images (--calib real)")
    q.add_argument("--images", type=int, default=128, help="calibration images")
    q.add_argument(
        "--synth-iters", type=int, help="synthesis outer iterations (bns|pse|d4c; default 3000)"
    )
    q.add_argument("--synth-batch", type=int, help="synthesis mini-batch (default 16)")
    q.add_argument(
        "--d4c-components",
        help="D4C ablation: pgsi | pgsi,scg | pgsi,pae | pgsi,scg,pae (default)",
    )
    q.add_argument(
        "--per-batch-adam",
        action="store_true",
        help="one Adam state per synthesis mini-batch (fixes the reference's shared-Adam drift)",
    )
    q.add_argument("--prompts", help="file, one class name per line: calibration/D4C prompts")
    q.add_argument(
        "--prompt-templates", help="file, one template with {c} per line (with --prompts or alone)"
    )
    q.add_argument(
        "--recon-iters", type=int, help="reconstruction iterations per unit (default 20000)"
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help="artifact directory to create")
    q.add_argument(
        "--workdir", help="stage checkpoints (default: .OUT.work beside OUT); rerun resumes"
    )
    q.add_argument("--task", help="built-in zero-shot task to report FP vs quantized accuracy on")
    q.add_argument("--json", action="store_true", help="one-line JSON summary")
    q.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="zero-shot top-1/top-5 on a folder of labelled images")
    _add_model_args(e)
    e.add_argument("--quantized", help="artifact directory from `d4c quantize`")
    e.add_argument("--classnames", help="file, one class name per line")
    e.add_argument("--templates", help="file, one template with {c} per line")
    e.add_argument("--images-dir", help="folder with one subfolder per class name")
    e.add_argument("--task", help="built-in task (see `d4c tasks`): its test split")
    e.add_argument(
        "--json", action="store_true", help="JSON output (the default; kept for scripts)"
    )
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("tasks", help="list the built-in zero-shot tasks")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tasks)

    i = sub.add_parser("inspect", help="verify an artifact's checksums and print its summary")
    i.add_argument("out")
    i.set_defaults(func=cmd_inspect)

    # Installed plugins (the service's serve/worker/db/keys) add their own subcommands here;
    # the core never imports them.
    for ep in entry_points(group="d4c.cli"):
        ep.load()(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except D4CError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
