"""Train a built-in tiny CLIP from scratch on the testbed world (contrastive, CPU).

    python -m d4c_core.testbed.train --arch d4c-tiny-vit --minutes 25 \
        --out d4c_core/weights/d4c-tiny-vit.safetensors [--seed 0] [--batch 256] [--lr 1e-3]

Every step draws a fresh batch from the world's training stream (infinite data, no epochs),
so the run is a pure function of (arch, seed, batch, lr, warmup, steps): every
``--checkpoint-every`` steps its state goes to ``<out>.train.safetensors``, and the same
command started again after a kill continues from there to the same weights. ``--minutes``
turns a time budget into a step count by timing a few steps on a throwaway copy; the model
card records the count, so ``--steps N`` reproduces the run step for step. Progress goes
to stderr as JSON lines; at the end the weights (fp16 by default) and a model card
``<out>.md`` are written, with zero-shot accuracy measured on the reloaded file, i.e. on
what is shipped.

On a shared machine start it with ``OMP_WAIT_POLICY=PASSIVE``: with the default spinning
OpenMP workers, a step ran 4-10x slower whenever another process held one of the 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.loss import ClipLoss
from torch import Tensor, nn

from d4c_core.evaluate import zero_shot
from d4c_core.models import create_architecture
from d4c_core.testbed.card import model_card
from d4c_core.testbed.resume import load_state, run_key, save_state, state_path
from d4c_core.testbed.shipped import evaluate_file, save_weights
from d4c_core.testbed.tasks import tasks
from d4c_core.testbed.world import Batch, caption_fits, generate

LOGIT_SCALE_MAX = math.log(100.0)  # CLIP's clamp: temperature never below 0.01
PROBE_STEPS = 10  # steps timed (on a copy) to turn a --minutes budget into a step count
QUICK_EVAL_N = 1000


class MaskedClipLoss(ClipLoss):
    """open_clip's ClipLoss with chosen off-diagonal pairs left out of both softmaxes.

    Captions like "a picture of a star" are true of every star in the batch; counting
    those pairs as negatives would teach the model to tell identical captions apart.
    """

    def __init__(self) -> None:
        super().__init__()
        self._ignore: Tensor | None = None

    def get_logits(
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        per_image, per_text = super().get_logits(
            image_features, text_features, logit_scale, logit_bias
        )
        if self._ignore is not None:
            per_image = per_image.masked_fill(self._ignore, float("-inf"))
            per_text = per_text.masked_fill(self._ignore.T, float("-inf"))
        return per_image, per_text

    def forward(  # type: ignore[override]
        self,
        image_features: Tensor,
        text_features: Tensor,
        logit_scale: Tensor,
        ignore: Tensor | None = None,
    ) -> Tensor:
        """``ignore[i, j]`` (i != j) drops image i / caption j from each other's softmax."""
        if ignore is not None:
            ignore = ignore & ~torch.eye(ignore.shape[0], dtype=torch.bool, device=ignore.device)
        self._ignore = ignore
        try:
            return super().forward(image_features, text_features, logit_scale)
        finally:
            self._ignore = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only, not norms, biases, embeddings, logit_scale."""
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or name.endswith("logit_scale")
        (keep if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup to ``base`` over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class CaptionTokens:
    """Tokenizer with a per-caption cache: the caption space is small and repeats constantly."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, Tensor] = {}

    def __call__(self, captions: Sequence[str]) -> Tensor:
        new = sorted({c for c in captions if c not in self.cache})
        if new:
            self.cache.update(zip(new, self.tokenizer(new), strict=True))
        return torch.stack([self.cache[c] for c in captions])


def train_batch(step: int, seed: int, batch: int) -> Batch:
    """The training stream: step ``step`` of seed ``seed`` (never an evaluation split's seed)."""
    return generate(batch, seed=step, stream=f"train-{seed}")


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: MaskedClipLoss,
    data: Batch,
    tokens: Tensor,
) -> float:
    """One contrastive update on ``data``; returns the loss (false negatives masked)."""
    model.train()
    img = model.encode_image(data.images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    loss = loss_fn(img, txt, model.logit_scale.exp(), caption_fits(data.scene, data.template))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
    return float(loss.detach())


@dataclass
class TrainConfig:
    arch: str
    out: Path
    seed: int = 0
    batch: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 200
    steps: int | None = None
    minutes: float | None = None
    log_every: int = 50
    eval_every: int = 500
    dtype: str = "fp16"
    threads: int = 2
    checkpoint_every: int = 250  # steps between resumable states (0: none)


def _log(**fields: Any) -> None:
    print(json.dumps(fields), file=sys.stderr, flush=True)


def _quick_eval(model: nn.Module, tokenizer: Any) -> float:
    task = tasks()["object10"]
    data = task.split("test", n=QUICK_EVAL_N)
    return float(zero_shot(model, tokenizer, task.classnames, task.templates, data)["top1"])


def plan_steps(cfg: TrainConfig, model: nn.Module, tokens_of: CaptionTokens, eval_s: float) -> int:
    """Steps that fit ``cfg.minutes``, timed on a throwaway copy of model and optimizer.

    Probing on a copy keeps the real run a function of its step count alone, so the model
    card's ``--steps N`` reproduces it exactly. Periodic evaluations share the budget.
    """
    assert cfg.minutes is not None
    start = time.perf_counter()
    probe = copy.deepcopy(model)
    opt = torch.optim.AdamW(param_groups(probe, cfg.weight_decay), lr=cfg.lr)
    loss_fn = MaskedClipLoss()
    t0 = start
    for i in range(PROBE_STEPS + 2):
        if i == 2:  # the first steps pay for allocations and caches
            t0 = time.perf_counter()
        data = train_batch(i, cfg.seed, cfg.batch)
        train_step(probe, opt, loss_fn, data, tokens_of(data.captions))
    per_step = (time.perf_counter() - t0) / PROBE_STEPS
    left = cfg.minutes * 60.0 - (time.perf_counter() - start)
    steps = max(1, int(left / (per_step + eval_s / cfg.eval_every)))
    _log(probe_s_per_step=round(per_step, 4), planned_steps=steps)
    return steps


def _build(cfg: TrainConfig) -> tuple[nn.Module, Any, torch.optim.Optimizer]:
    """The seeded random-init model in train mode, its tokenizer and AdamW: everything the
    run's outcome depends on besides the step count."""
    torch.set_num_threads(cfg.threads)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = create_architecture(cfg.arch)
    model.train()
    tokenizer = open_clip.get_tokenizer(cfg.arch)
    opt = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    return model, tokenizer, opt


@dataclass
class _Window:
    """Loss and speed since the last log line (one line per ``log_every`` steps)."""

    t: float
    steps: int = 0
    loss: float = 0.0

    def fields(self, step: int, lr: float, batch: int, model: nn.Module, start: float) -> dict:
        now = time.perf_counter()
        dt = now - self.t
        return {
            "step": step,
            "loss": round(self.loss / self.steps, 4),
            "lr": lr,
            "img_per_s": round(self.steps * batch / dt, 1),
            "steps_per_s": round(self.steps / dt, 3),
            "logit_scale": round(float(model.logit_scale.detach().exp()), 2),
            "elapsed_s": round(now - start, 1),
        }


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the training; return a summary (steps, wall time, losses, speeds)."""
    if (cfg.steps is None) == (cfg.minutes is None):
        raise ValueError("give exactly one of steps or minutes")
    model, tokenizer, opt = _build(cfg)
    tokens_of = CaptionTokens(tokenizer)
    loss_fn = MaskedClipLoss()

    settings, state_file = asdict(cfg), state_path(cfg.out)
    got = load_state(state_file, model, opt, settings, cfg.steps) if cfg.checkpoint_every else None
    if got is not None:
        total, warmup, first, acc0 = got.total, got.warmup, got.step, float("nan")
        _log(resumed_at=first, planned_steps=total, state=str(state_file))
    else:
        t0 = time.perf_counter()
        acc0 = _quick_eval(model, tokenizer)
        eval_s = time.perf_counter() - t0
        _log(step=0, zs_object10_top1=acc0, eval_s=round(eval_s, 2))
        total = cfg.steps if cfg.steps is not None else plan_steps(cfg, model, tokens_of, eval_s)
        warmup, first = max(1, min(cfg.warmup, total // 4)), 0
        _log(step=0, planned_steps=total, warmup=warmup)
    key = run_key(settings, total)
    start = time.perf_counter()
    window = _Window(start)
    step, loss, last_acc = first, float("nan"), acc0
    while step < total:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, warmup, cfg.lr)
        data = train_batch(step, cfg.seed, cfg.batch)
        loss = train_step(model, opt, loss_fn, data, tokens_of(data.captions))
        step += 1
        window.steps += 1
        window.loss += loss
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
            save_state(state_file, model, opt, step, total, warmup, key)
        do_eval = step % cfg.eval_every == 0 or step == total
        if do_eval or step % cfg.log_every == 0:
            lr = lr_at(step - 1, total, warmup, cfg.lr)
            fields = window.fields(step, lr, cfg.batch, model, start)
            if do_eval:
                last_acc = _quick_eval(model, tokenizer)
                fields["zs_object10_top1"] = last_acc
            _log(**fields)
            window = _Window(time.perf_counter())
    wall = time.perf_counter() - start
    return {
        "model": model,
        "resumed_at": first,
        "steps": step,
        "warmup": warmup,
        "wall_s": wall,
        "final_loss": loss,
        "quick_top1": last_acc,
        "img_per_s": (step - first) * cfg.batch / wall,
    }


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m d4c_core.testbed.train", description=__doc__)
    p.add_argument("--arch", required=True, choices=["d4c-tiny-vit", "d4c-tiny-rn"])
    p.add_argument("--out", type=Path, required=True, help="weights file (.safetensors)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--minutes", type=float, help="wall-clock budget for the steps (final evaluation extra)"
    )
    budget.add_argument("--steps", type=int, help="exact number of steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=250,
        help="steps between resumable states in OUT.train.safetensors (0: none); a run "
        "started again with the same settings continues from the last one",
    )
    a = p.parse_args(argv)
    if a.steps is not None and a.steps <= 0:
        p.error("--steps must be > 0")
    if a.minutes is not None and a.minutes <= 0:
        p.error("--minutes must be > 0")
    return TrainConfig(
        arch=a.arch,
        out=a.out,
        seed=a.seed,
        batch=a.batch,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup=a.warmup,
        steps=a.steps,
        minutes=a.minutes,
        log_every=a.log_every,
        eval_every=a.eval_every,
        dtype=a.dtype,
        threads=a.threads,
        checkpoint_every=a.checkpoint_every,
    )


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_args(argv)
    wait = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={wait} " if wait else "") + (
        "python -m d4c_core.testbed.train "
        + shlex.join(sys.argv[1:] if argv is None else list(argv))
    )
    if cfg.threads > 1 and (wait or "").upper() != "PASSIVE":
        _log(
            warning="OMP_WAIT_POLICY is not PASSIVE: when another process holds a core, "
            "spinning OpenMP threads made training steps 4-10x slower here; start with "
            "OMP_WAIT_POLICY=PASSIVE (read when torch loads) or use --threads 1"
        )
    summary = train(cfg)
    meta = {
        "arch": cfg.arch,
        "steps": str(summary["steps"]),
        "seed": str(cfg.seed),
        "source": "d4c_core.testbed.train",
    }
    save_weights(summary["model"], cfg.out, cfg.dtype, meta)
    t0 = time.perf_counter()
    results = evaluate_file(cfg.arch, cfg.out)
    _log(final=results, eval_s=round(time.perf_counter() - t0, 1))
    card = cfg.out.with_suffix(".md")
    card.write_text(model_card(cfg, summary, results, command), encoding="utf-8")
    state_path(cfg.out).unlink(missing_ok=True)  # the run is complete: nothing to resume
    _log(
        weights=str(cfg.out),
        card=str(card),
        bytes=cfg.out.stat().st_size,
        config={k: str(v) for k, v in asdict(cfg).items()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
