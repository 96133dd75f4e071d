"""bench/calib_diagnose.py's measurements against independent computations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def diag() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_calib_diagnose", BENCH / "calib_diagnose.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_layer_stats_percentile_and_bns_loss(diag: ModuleType) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    net.eval()
    x = torch.randn(8, 3, 10, 10, dtype=torch.float64).float()
    with torch.no_grad():
        h = net[0](x)
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    bn.running_mean.copy_(h.mean(dim=(0, 2, 3)) + 0.5)  # mean off by 0.5 in every channel
    bn.running_var.copy_(h.var(dim=(0, 2, 3), unbiased=False))
    p999, bns = diag.layer_stats(net, x)
    # the 99.9th percentile of |input| by torch.quantile (an independent implementation)
    with torch.no_grad():
        relu_out = net[2](net[1](net[0](x)))
    for name, inp in (("0", x), ("3", relu_out)):
        want = float(torch.quantile(inp.abs().flatten().double(), 0.999, interpolation="lower"))
        assert p999[name] == pytest.approx(want, rel=1e-6)
    assert bns == pytest.approx(0.25, rel=1e-5)  # (0.5)^2 from the mean, 0 from the variance


def test_no_batchnorm_gives_no_bns_loss(diag: ModuleType) -> None:
    net = nn.Sequential(nn.Linear(5, 3))
    p999, bns = diag.layer_stats(net, torch.randn(4, 5))
    assert bns is None and set(p999) == {"0"}
