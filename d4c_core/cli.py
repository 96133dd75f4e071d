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
from d4c_core.recipe_cli import add_recipe_args

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
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)"
    )


def _add_eval_task_arg(p: argparse.ArgumentParser, help_text: str) -> None:
    # ``eval_task`` is the job body's name for it; --task is the older spelling.
    p.add_argument("--eval-task", "--task", dest="eval_task", metavar="TASK", help=help_text)


def cmd_quantize(args: argparse.Namespace) -> int:
    from d4c_core.calibration import check_method
    from d4c_core.pipeline import JobSpec, run
    from d4c_core.recipe_cli import recipe_from_args

    spec = _model_spec(args)
    if spec.checkpoint is not None:  # a bad file is refused before any stage starts
        from d4c_core.models import check_checkpoint_file

        if not spec.checkpoint.is_file():
            raise D4CError(f"--checkpoint {spec.checkpoint} does not exist")
        check_checkpoint_file(spec.checkpoint, spec.arch, f"--checkpoint {spec.checkpoint}")
    recipe = recipe_from_args(args)
    check_method(args.model, recipe.calibration.method)
    calib_dir = Path(args.calib_dir) if args.calib_dir else None
    if recipe.calibration.method == "real" and calib_dir is None:
        raise D4CError("--calib real needs --calib-dir DIR")
    if calib_dir is not None and not calib_dir.is_dir():
        raise D4CError(f"--calib-dir {calib_dir} is not a directory")
    _check_cuda(args.device)
    out = Path(args.out)
    work = Path(args.workdir) if args.workdir else out.parent / f".{out.name}.work"
    # Both are deleted on success (OUT replaced, work dir cleaned up): never someone's data.
    _check_replaceable(out, "--out", "manifest.json", "artifact")
    _check_replaceable(work, "--workdir", "units", "work dir")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise D4CError(f"--out {out} already holds an artifact; pass --overwrite to replace it")
    eval_task = _eval_task(args.eval_task) if args.eval_task else None
    job = JobSpec(spec, recipe, calib_dir=calib_dir, eval_task=eval_task, device=args.device)

    def progress(stage: str, frac: float) -> None:
        if not args.quiet:
            print(f"[{frac * 100:5.1f}%] {stage}", file=sys.stderr, flush=True)

    report = run(job, work, out, on_progress=progress)
    shutil.rmtree(work, ignore_errors=True)  # finished: nothing left to resume
    summary = {"out": str(out), "timings": report["timings"], "metrics": report["metrics"]}
    print(json.dumps(summary, indent=None if args.json else 2))
    return 0


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
    if args.eval_task and any(folder):
        raise D4CError("give --eval-task or --classnames/--templates/--images-dir, not both")
    if not args.eval_task:
        for flag in ("classnames", "templates", "images_dir"):
            if getattr(args, flag) is None:
                raise D4CError(f"--{flag.replace('_', '-')} is required (or --eval-task NAME)")
    task = _eval_task(args.eval_task) if args.eval_task else None
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
    from d4c_core.artifacts import MANIFEST_FILE, inspect

    out = Path(args.out)
    if not out.is_dir():
        raise D4CError(f"{out}: no such directory")
    if not (out / MANIFEST_FILE).is_file():
        raise D4CError(f"{out}: not a d4c artifact (no {MANIFEST_FILE})")
    print(json.dumps(inspect(out), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """ONNX graphs of a verified artifact, in ``OUT/onnx/`` unless ``--dest`` says otherwise.

    The artifact's listed files are untouched (``verify`` checks only those), so ``OUT``
    stays a valid artifact. The graphs are written to a temp dir and renamed into place;
    ``--overwrite`` replaces an existing destination only once the new export is complete.
    """
    from d4c_core.artifacts import MANIFEST_FILE, verify
    from d4c_core.onnx_export import export_onnx

    out = Path(args.out)
    if not out.is_dir():
        raise D4CError(f"{out}: no such directory")
    if not (out / MANIFEST_FILE).is_file():
        raise D4CError(f"{out}: not a d4c artifact (no {MANIFEST_FILE})")
    dest = Path(args.dest) if args.dest else out / "onnx"
    if dest.exists() and not args.overwrite:
        raise D4CError(f"{dest}: already exists (--overwrite replaces it)")
    verify(out)
    fresh = dest.with_name(f".{dest.name}.new")
    shutil.rmtree(fresh, ignore_errors=True)
    files = export_onnx(out, fresh)
    if dest.exists():
        shutil.rmtree(dest)
    fresh.rename(dest)
    print(json.dumps({k: str(dest / p.name) for k, p in files.items()}))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from d4c_core.models import BUILTIN_ARCHS, list_archs

    rows = [{"arch": a, "builtin": a in BUILTIN_ARCHS} for a in list_archs()]
    rows.sort(key=lambda r: (not r["builtin"], r["arch"]))
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['arch']}{'  (built-in weights: --pretrained builtin)' if r['builtin'] else ''}"
            )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="d4c", description="Data-free quantization of CLIP models (D4C).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="quantize a CLIP and write an artifact directory")
    _add_model_args(q)
    q.add_argument("--out", required=True, help="artifact directory to create")
    q.add_argument("--overwrite", action="store_true", help="replace an existing artifact in OUT")
    q.add_argument("--calib-dir", help="folder of real calibration images (--calib real)")
    q.add_argument(
        "--workdir", help="stage checkpoints (default: .OUT.work beside OUT); rerun resumes"
    )
    _add_eval_task_arg(q, "report FP vs quantized zero-shot accuracy on this built-in task")
    q.add_argument("--json", action="store_true", help="one-line JSON summary")
    q.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_recipe_args(q)
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="zero-shot top-1/top-5 on a folder of labelled images")
    _add_model_args(e)
    e.add_argument("--quantized", help="artifact directory from `d4c quantize`")
    e.add_argument("--classnames", help="file, one class name per line")
    e.add_argument("--templates", help="file, one template with {c} per line")
    e.add_argument("--images-dir", help="folder with one subfolder per class name")
    _add_eval_task_arg(e, "built-in task (see `d4c tasks`): its test split")
    e.add_argument(
        "--json", action="store_true", help="JSON output (the default; kept for scripts)"
    )
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("tasks", help="list the built-in zero-shot tasks")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tasks)

    m = sub.add_parser("models", help="list the architectures --model accepts")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("inspect", help="verify an artifact's checksums and print its summary")
    i.add_argument("out")
    i.set_defaults(func=cmd_inspect)

    x = sub.add_parser("export", help="export an artifact as ONNX (image and text encoders)")
    x.add_argument("out", help="artifact directory from `d4c quantize`")
    x.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    x.add_argument("--dest", help="output directory (default: OUT/onnx)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    x.set_defaults(func=cmd_export)

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
