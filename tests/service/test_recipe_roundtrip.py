"""A manifest's recipe submitted as a job reproduces that job (issue: "one recipe everywhere").

``d4c quantize`` writes an artifact; its ``manifest.json`` is handed as is to ``d4c submit
--recipe``, which sends its recipe over HTTP to the embedded default (SQLite, filesystem
broker, in-process worker). The job's stored recipe and the downloaded manifest's recipe must
equal the CLI's, and on the same machine the weights file must be the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.support.jobs import tiny_recipe
from tests.support.stack import ServiceStack


def _d4c(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "d4c_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_manifest_recipe_submitted_over_http_reproduces_the_cli_job(
    make_stack: Callable[..., ServiceStack], tmp_path: Path
) -> None:
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(json.dumps(tiny_recipe(recon_iters=3)))
    stack = make_stack(None, None)  # the embedded default
    env = stack.env
    cli_out = tmp_path / "cli"
    run = _d4c(
        "quantize", "--model", "d4c-tiny-vit", "--recipe", str(recipe_file), "--quiet",
        "--out", str(cli_out), env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    manifest = json.loads((cli_out / "manifest.json").read_text())

    stack.start_api()
    key = stack.http.headers["Authorization"].removeprefix("Bearer ")
    http_out = tmp_path / "http"
    sub = _d4c(
        "submit", "--url", str(stack.http.base_url), "--api-key", key, "--json",
        "--model", manifest["model"]["arch"], "--recipe", str(cli_out / "manifest.json"),
        "--out", str(http_out), env=env | {"D4C_URL": "", "D4C_API_KEY": ""},
    )  # fmt: skip
    assert sub.returncode == 0, sub.stderr + sub.stdout
    summary = json.loads(sub.stdout.strip().splitlines()[-1])
    assert summary["state"] == "succeeded", summary

    job = stack.job(summary["job_id"])
    assert job["recipe"] == manifest["recipe"]  # the job ran exactly the manifest's recipe
    served = json.loads((http_out / "manifest.json").read_text())
    assert served["recipe"] == manifest["recipe"] and served["model"] == manifest["model"]
    files = {f: manifest["files"][f]["sha256"] for f in ("model.safetensors",)}
    assert {f: served["files"][f]["sha256"] for f in files} == files, (
        "same recipe, same machine: the weights must be the same bytes"
    )
    assert os.environ.get("D4C_DATA_DIR") != str(stack.data_dir)  # the stack's own data dir
