"""The service benchmarks (bench/api_load.py, bench/service_overhead.py).

A whole run is not cheap, even reduced: ``api_load.py --quick`` starts two servers (the API
imports torch) and takes about 80 s on 2 busy cores, and ``service_overhead.py --quick`` runs
three quantization jobs (minutes). Those runs are marked ``slow``; the default suite checks the
parts a wrong number would come from: wrk output parsing, the verdict lines, and that the
overhead benchmark's HTTP body is the same recipe as its CLI arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from app.schemas import JobCreate
from d4c_core.cli import build_parser
from d4c_core.recipe_cli import recipe_from_args

BENCH = Path(__file__).resolve().parents[2] / "bench"

WRK_OUT = """Running 10s test @ http://127.0.0.1:8000/jobs/abc
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    40.12ms    5.00ms   1.20s    90.00%
    Req/Sec     1.60k   100.00     1.80k    80.00%
  Latency Distribution
     50%  850.00us
     75%   42.00ms
     90%   45.00ms
     99%   60.00ms
  16000 requests in 10.00s, 10.00MB read
  Non-2xx or 3xx responses: 5
  Socket errors: connect 0, read 1, write 0, timeout 2
Requests/sec:   1600.00
Transfer/sec:      1.00MB
"""


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def api_load() -> ModuleType:
    return _load("api_load")


@pytest.fixture(scope="module")
def overhead() -> ModuleType:
    return _load("service_overhead")


def test_parse_wrk_units_errors_and_percentiles(api_load: ModuleType) -> None:
    r = api_load.parse_wrk(WRK_OUT)
    assert r.requests == 16000 and r.seconds == 10.0 and r.rps == 1600.0
    assert r.p50_ms == pytest.approx(0.85) and r.p90_ms == 45.0 and r.p99_ms == 60.0
    assert r.max_ms == 1200.0
    assert r.errors == 5 + 3  # non-2xx plus socket errors: either invalidates a run


def test_parse_wrk_rejects_garbage(api_load: ModuleType) -> None:
    with pytest.raises(api_load.BenchError):
        api_load.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


def test_report_verdicts(api_load: ModuleType) -> None:
    def row(server: str, conns: int, rps: float, p99: float) -> object:
        res = api_load.LoadResult(int(rps * 10), 10.0, 0, 1.0, 2.0, p99, p99 * 2)
        return api_load.Row(server, conns, res, 500.0)

    rows = [
        row("bare FastAPI + asyncpg", 64, 2000, 80),
        row("d4c API (auth, tenancy)", 64, 1600, 90),
        row("d4c API (auth, tenancy)", 16, 1400, 60),
    ]
    args = argparse.Namespace(
        argv=["--quick"], generator="python", threads=1, duration=2.0, warmup=1.0, rounds=1
    )
    text = api_load.report(rows, args, ["- machine: test"], "15")
    assert "1,600 (80% of the bare baseline) — met" in text
    assert "p99 ≤ 50 ms at 16 connections: 60.0 ms — NOT met" in text
    assert "| d4c API (auth, tenancy) | 16 | 1,400 |" in text


def test_overhead_body_is_the_cli_recipe(overhead: ModuleType) -> None:
    recipe = overhead.Recipe("d4c-tiny-vit", "w4a8", "noise", 32, 50, "object10", 0)
    body = JobCreate.model_validate(recipe.body())  # what the API accepts, field for field
    args = recipe.cli_args(Path("out"))
    cli = build_parser().parse_args(args)
    assert body.recipe == recipe_from_args(cli)  # the same Recipe the CLI would run
    assert body.eval_task == cli.eval_task


@pytest.mark.slow
@pytest.mark.parametrize("script", ["api_load.py", "service_overhead.py"])
def test_quick_run(script: str, tmp_path: Path) -> None:
    """The whole benchmark in its reduced mode (minutes: see the module docstring)."""
    out = tmp_path / "section.md"
    subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        check=True,
        timeout=1800,
    )
    assert out.read_text().startswith("## ")
