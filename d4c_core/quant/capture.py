"""Reconstruction inputs and targets from block boundaries: capture in linear time.

A unit's input is what the already-quantized prefix feeds it, its target what the FP model's
unit outputs. Running the whole prefix over the calibration set for every unit costs the
square of the depth (RN50: 1,137 s of capture next to a 12 s fake-quantized forward). Both
towers of an open_clip CLIP are chains of blocks (ResNet bottlenecks then the attention pool;
transformer residual blocks) whose output is the next block's input, so the quantized and the
FP activations entering the current block are kept and advanced one block at a time:

- a unit's input: a replay of its own block from the kept quantized boundary, stopped at the
  unit (earlier units of the block are final by then, and replay their recorded outputs
  instead of recomputing them: what runs is the block's glue — norms, attention, residuals);
- its target: one FP pass over the block per block, which keeps every unit's output and the
  next FP boundary;
- leaving a block: the finished quantized block runs once over its boundary (its units from
  their recorded outputs).

Units outside a chain (none in the supported towers) and the first block after a resume fall
back to the prefix capture, which is also the reference the tests compare against.

The unit reconstructed last runs for real in the next replay (or in leaving the block): its
error there is its MSE after reconstruction, and its outputs are recorded for later replays.

Memory: two boundaries (quantized, FP), the current block's unit targets and its finished
units' outputs. A boundary pair larger than ``budget_bytes`` is spilled to safetensors files
in ``spill_dir`` (exact; read back chunk by chunk), so a real-size calibration set never
needs more than one block's data.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from open_clip.modified_resnet import Bottleneck, ModifiedResNet
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from d4c_core.quant.wrap import fp_mode

# Boundary pair (quantized + FP) kept in memory before it is spilled to disk.
DEFAULT_BUDGET_BYTES = 4 << 30


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _first(args: tuple[Any, ...]) -> Tensor:
    return args[0].detach().clone()


class _Rows:
    """Chunks copied, as hooks see them, into one tensor of ``total`` rows allocated at the
    first chunk: one copy of the data (a clone per chunk and a ``cat`` made two, and at
    real size the copies were a fifth of the capture)."""

    def __init__(self, total: int) -> None:
        self.total, self.at = total, 0
        self.buf: Tensor | None = None

    def add(self, chunk: Tensor) -> None:
        if self.buf is None:
            self.buf = chunk.new_empty((self.total, *chunk.shape[1:]))
        self.buf[self.at : self.at + len(chunk)].copy_(chunk)
        self.at += len(chunk)

    def tensor(self) -> Tensor:
        assert self.buf is not None and self.at == self.total, (self.at, self.total)
        return self.buf


def capture(
    model: nn.Module,
    module: nn.Module,
    feed: Callable[[Tensor], object],
    data: Tensor,
    batch: int,
    output: bool,
) -> Tensor:
    """Run ``feed`` over ``data`` in chunks, keeping ``module``'s input (or output) only."""
    got: list[Tensor] = []

    def pre(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        got.append(_first(args))
        raise _Stop

    def post(_m: nn.Module, _a: object, out: Tensor) -> None:
        got.append(out.detach().clone())
        raise _Stop

    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            for chunk in data.split(batch):
                with contextlib.suppress(_Stop):
                    feed(chunk)
    finally:
        handle.remove()
    return torch.cat(got)


def _tower_input(
    model: nn.Module, tower: str, images: Tensor, tokens: Tensor
) -> tuple[Callable[[Tensor], object], Tensor]:
    """The tower's encoder and the calibration inputs it runs on."""
    return (model.encode_image, images) if tower == "image" else (model.encode_text, tokens)


def prefix_data(
    model: nn.Module, module: nn.Module, tower: str, images: Tensor, tokens: Tensor, batch: int
) -> tuple[Tensor, Tensor]:
    """(quantized-prefix input, FP output) of ``module`` by running the tower from its input:
    one pass each, whatever the depth. The reference for the boundary capture."""
    feed, data = _tower_input(model, tower, images, tokens)
    inputs = capture(model, module, feed, data, batch, output=False)
    with fp_mode(model):
        targets = capture(model, module, feed, data, batch, output=True)
    return inputs, targets


def chain(model: nn.Module, tower: str) -> list[nn.Module]:
    """The tower's blocks in execution order, each one's output the next one's input."""
    if tower == "image":
        visual = model.visual
        if isinstance(visual, ModifiedResNet):
            blocks = [m for m in visual.modules() if isinstance(m, Bottleneck)]
            return [*blocks, visual.attnpool]
        owner = visual
    else:
        owner = model
    resblocks = getattr(getattr(owner, "transformer", None), "resblocks", None)
    return list(resblocks) if resblocks is not None else []


Call = tuple[Tensor, tuple[Any, ...], dict[str, Any]]


class Boundary:
    """A block's calls over the calibration set, chunk by chunk: the activation (in memory or
    in a spill file) and the call's other arguments (e.g. the text tower's causal mask)."""

    def __init__(self, calls: list[Call]) -> None:
        self._calls: list[Call] = calls
        self._files: list[Path] = []
        self.rows = sum(len(x) for x, _, _ in calls)  # samples (dim 0) over all chunks

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x, _, _ in self._calls)

    def spill(self, folder: Path, tag: str) -> None:
        for i, (x, args, kwargs) in enumerate(self._calls):
            path = folder / f"{tag}-{i:05d}.safetensors"
            save_file({"x": x.detach().cpu().contiguous()}, path)
            self._files.append(path)
            self._calls[i] = (torch.empty(0, device=x.device), args, kwargs)

    def __iter__(self) -> Iterator[Call]:
        for i, (x, args, kwargs) in enumerate(self._calls):
            if self._files:
                x = load_file(self._files[i])["x"].to(x.device)
            yield x, args, kwargs

    def drop(self) -> None:
        for path in self._files:
            path.unlink(missing_ok=True)
        self._calls, self._files = [], []


def _advance(block: nn.Module, boundary: Boundary) -> Boundary:
    """The next block's boundary: this block's outputs, the call's other arguments kept."""
    with torch.no_grad():
        return Boundary([(block(x, *args, **kwargs), args, kwargs) for x, args, kwargs in boundary])


class BoundaryCapture:
    """Data of the reconstruction units ``units``, requested in model order (the loop's)."""

    def __init__(
        self,
        model: nn.Module,
        units: list[nn.Module],
        images: Tensor,
        tokens: Tensor,
        batch: int,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        spill_dir: Path | None = None,
    ) -> None:
        self.model, self.images, self.tokens, self.batch = model, images, tokens, batch
        self.budget_bytes, self.spill_dir = budget_bytes, spill_dir
        self._units = {id(m) for m in units}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._chains = {t: chain(model, t) for t in ("image", "text")}
        self._owner: dict[int, tuple[str, int]] = {}
        for tower, blocks in self._chains.items():
            for k, blk in enumerate(blocks):
                for m in blk.modules():
                    self._owner[id(m)] = (tower, k)
        self._at: tuple[str, int] | None = None  # block whose boundaries are held
        self._q: Boundary | None = None
        self._fp_next: Boundary | None = None
        self._targets: dict[int, Tensor] = {}
        # Finished units of the current block and their final outputs per chunk: replays
        # read them instead of recomputing the unit (what is left to run is the block's glue).
        self._done: dict[int, tuple[nn.Module, list[Tensor]]] = {}
        self.spilled = 0  # boundaries written to disk, for tests and logs

    def data(
        self, module: nn.Module, tower: str, finished: tuple[nn.Module, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, float | None]:
        """(quantized input, FP output) of ``module`` over the calibration set, and the MSE of
        ``finished`` — the unit reconstructed just before, with its targets — whose final
        outputs the replay computes anyway (None where it did not run exactly once over the
        set: the caller measures it)."""
        meter = None
        if finished is not None:
            keep = not any(finished[0] is b for b in self._chains[tower])
            meter = _ErrorMeter(*finished, keep=keep)
        try:
            where = self._owner.get(id(module))
            if where is None or where[0] != tower:
                self.close()
                inputs, targets = prefix_data(
                    self.model, module, tower, self.images, self.tokens, self.batch
                )
            else:
                if where != self._at:
                    self._enter(*where)
                assert self._q is not None
                with _replaying(self._done.values()):
                    inputs = _stop_at(self._chains[tower][where[1]], module, self._q)
                targets = self._targets.pop(id(module))
        finally:
            if meter is not None:
                meter.remove()
        mse = None if meter is None else meter.mse()
        reusable = meter is not None and mse is not None and meter.outs is not None
        if reusable and self._owner.get(id(meter.module)) == self._at:  # still this block
            self._done[id(meter.module)] = (meter.module, meter.outs)
        return inputs, targets, mse

    def _enter(self, tower: str, k: int) -> None:
        """Hold block ``k``'s boundaries: advanced from the block before, or captured afresh."""
        blocks = self._chains[tower]
        if self._at is not None and self._at[0] == tower and self._at[1] < k:
            assert self._q is not None and self._fp_next is not None
            q, fp = self._q, self._fp_next
            for j in range(self._at[1], k):
                with _replaying(self._done.values()):
                    q_next = _advance(blocks[j], q)
                self._done = {}
                q.drop()
                q = q_next
            for j in range(self._at[1] + 1, k):  # FP: blocks without units, if any
                with fp_mode(self.model):
                    fp_n = _advance(blocks[j], fp)
                fp.drop()
                fp = fp_n
        else:
            self.close()
            q, fp = self._prefix_boundaries(tower, blocks[k])
        self._at = (tower, k)
        self._q = q
        self._fp_next = self._fp_pass(blocks[k], fp)
        fp.drop()
        self._spill_if_over()

    def _prefix_boundaries(self, tower: str, block: nn.Module) -> tuple[Boundary, Boundary]:
        feed, data = _tower_input(self.model, tower, self.images, self.tokens)
        out = []
        for fp in (False, True):
            calls: list[Call] = []

            def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                calls.append((_first(args), tuple(args[1:]), dict(kwargs)))  # noqa: B023
                raise _Stop

            handle = block.register_forward_pre_hook(pre, with_kwargs=True)
            try:
                with torch.no_grad(), fp_mode(self.model) if fp else contextlib.nullcontext():
                    for chunk in data.split(self.batch):
                        with contextlib.suppress(_Stop):
                            feed(chunk)
            finally:
                handle.remove()
            out.append(Boundary(calls))
        return out[0], out[1]

    def _fp_pass(self, block: nn.Module, fp: Boundary) -> Boundary:
        """One FP pass over the block: every unit's target, and the next FP boundary."""
        got: dict[int, _Rows] = {}

        def post(mod: nn.Module, _a: object, out: Tensor) -> None:
            got[id(mod)].add(out.detach())

        handles = []
        for m in block.modules():
            if id(m) in self._units:
                got[id(m)] = _Rows(fp.rows)
                handles.append(m.register_forward_hook(post))
        try:
            with fp_mode(self.model):
                nxt = _advance(block, fp)
        finally:
            for h in handles:
                h.remove()
        self._targets = {i: r.tensor() for i, r in got.items()}
        return nxt

    def _spill_if_over(self) -> None:
        assert self._q is not None and self._fp_next is not None
        if self._q.nbytes + self._fp_next.nbytes <= self.budget_bytes:
            return
        folder = self.spill_dir
        if folder is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="d4c-capture-")
            folder = Path(self._tmp.name)
        folder.mkdir(parents=True, exist_ok=True)
        self._q.spill(folder, "q")
        self._fp_next.spill(folder, "fp")
        self.spilled += 2

    def close(self) -> None:
        """Drop whatever is held (spill files included)."""
        for b in (self._q, self._fp_next):
            if b is not None:
                b.drop()
        self._at, self._q, self._fp_next, self._targets, self._done = None, None, None, {}, {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.contextmanager
def _replaying(done: Iterable[tuple[nn.Module, list[Tensor]]]) -> Iterator[None]:
    """Each finished unit returns its recorded output for the chunk instead of computing it
    (the same tensor its forward gives: same inputs, same final state)."""
    patched = []
    for mod, outs in done:
        it = iter(outs)
        mod.forward = lambda *_a, _it=it, **_k: next(_it)  # type: ignore[method-assign]
        patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


class _ErrorMeter:
    """Sum of squared errors of ``module``'s outputs against ``targets``, chunk by chunk, as
    replays run it; valid only if it ran exactly once over the set, in order."""

    def __init__(self, module: nn.Module, targets: Tensor, keep: bool) -> None:
        self.module, self.targets, self.seen, self.total = module, targets, 0, 0.0
        self.outs: list[Tensor] | None = [] if keep else None  # the outputs, per chunk
        self.handle = module.register_forward_hook(self._post)

    def _post(self, _m: nn.Module, _a: object, out: Tensor) -> None:
        n = len(out)
        if self.seen + n <= len(self.targets):
            d = (out - self.targets[self.seen : self.seen + n]).reshape(-1)
            self.total += torch.dot(d, d).item()
            if self.outs is not None:
                self.outs.append(out.detach().clone())
        self.seen += n

    def remove(self) -> None:
        self.handle.remove()

    def mse(self) -> float | None:
        return self.total / self.seen if self.seen == len(self.targets) else None


def _stop_at(block: nn.Module, module: nn.Module, boundary: Boundary) -> Tensor:
    """``module``'s input over the boundary's chunks, replaying ``block`` only up to it."""
    got = _Rows(boundary.rows)

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        got.add(args[0].detach())
        raise _Stop

    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            for x, args, kwargs in boundary:
                with contextlib.suppress(_Stop):
                    block(x, *args, **kwargs)
    finally:
        handle.remove()
    return got.tensor()
