"""Recovery and burst figures: runs the fault and load tests and tabulates what they measured.

    python bench/faults.py [--out bench/results/faults.md]

The tests are the benchmark: ``tests/service/test_faults.py`` injects each fault into real
API, worker, PostgreSQL and Redis processes and times the recovery; the burst test fires 200
concurrent ``POST /jobs`` from a separate process. With ``D4C_BENCH_RECORD`` set, each
figure a test measured is appended there (``record`` fixture); this script runs them once,
fails if any test fails (a figure from a failed recovery is no figure), and writes a
markdown section.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from service_harness import ROOT, machine_lines, write_section

TESTS = ("tests/service/test_faults.py", "tests/service/test_load_burst.py")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults.md")
    args = p.parse_args(argv)
    header = machine_lines()  # load average before the run, not after
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.jsonl"
        env = os.environ | {"D4C_BENCH_RECORD": str(record), "HF_HUB_OFFLINE": "1"}
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
            cwd=ROOT,
            env=env,
        )
        seconds = time.monotonic() - t0
        text = record.read_text() if record.is_file() else ""
        rows = [json.loads(line) for line in text.splitlines()]
    if done.returncode != 0:
        print("a fault or load test failed: no figures written", file=sys.stderr)
        return 1
    lines = [
        "## Fault recovery and POST burst (`python bench/faults.py`)",
        "",
        *header,
        f"- tests: {', '.join(TESTS)} — all passed, {seconds:.0f} s in all",
        "",
        "| case | measure | value |",
        "|---|---|---:|",
    ]
    for r in rows:
        value = f"{r['value']:.0f}" if r["unit"] == "jobs" else f"{r['value']:.1f}"
        lines.append(f"| {r['case']} | {r['measure']} | {value} {r['unit']} |")
    write_section(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
