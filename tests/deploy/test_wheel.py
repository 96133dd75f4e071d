"""The package works from a wheel, with no source tree anywhere on the path.

An editable install hides packaging mistakes: every file of the checkout is importable, and a
path computed relative to the code finds files that a wheel never ships (the Alembic scripts
once lived beside the packages, so a wheel's `d4c db upgrade` failed). Here a wheel is built
from a copy of the sources, installed into a fresh venv, and its own `d4c` runs from a
directory outside the checkout.

Isolation from the checkout: the venv is created *without* system site-packages and the
wheel is installed into it first (so pip sees no other d4c-service). Only then does a ``.pth``
file in the venv add the interpreter's site-packages directories as plain ``sys.path``
entries, after the venv's own, so torch & co. import without being reinstalled. A path
line in a ``.pth`` does not process the ``.pth`` files of that directory, so the editable
install's import hook (``__editable__...finder``, which maps ``app`` to the checkout) is
never installed; the test checks that instead of assuming it, and checks that every service
module and the migration scripts resolve inside the venv.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from app.core.security import hash_key

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "app", "d4c_core", "worker")
TIMEOUT_S = 300


@dataclass(frozen=True)
class WheelVenv:
    python: Path
    d4c: Path
    site_packages: Path
    cwd: Path  # outside the checkout
    data_dir: Path
    env: dict[str, str]

    def run(self, *args: str | Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _host_site_dirs() -> list[str]:
    """The site directories this interpreter processes, minus anything inside the checkout."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    return [d for d in dirs if Path(d).is_dir() and not Path(d).resolve().is_relative_to(ROOT)]


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without anything that points Python or d4c elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("D4C_", "PYTHON", "PIP_")) and k not in ("VIRTUAL_ENV",)
    }
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> WheelVenv:
    base = tmp_path_factory.mktemp("wheel")
    assert not base.resolve().is_relative_to(ROOT)
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the checkout
    # other runs are using.
    src = base / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    env = _clean_env()
    dist = base / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(dist), str(src)],
        check=True, env=env, timeout=TIMEOUT_S, cwd=base,
    )  # fmt: skip
    (wheel,) = dist.glob("d4c_service-*.whl")

    venv = base / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)],
        check=True, env=env, timeout=TIMEOUT_S,
    )  # fmt: skip
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "-q", str(wheel)],
        check=True, env=env, timeout=TIMEOUT_S, cwd=base,
    )  # fmt: skip
    purelib = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, env=env, timeout=TIMEOUT_S,
    ).stdout.strip()  # fmt: skip
    site_packages = Path(purelib)
    shutil.rmtree(src)  # pytest keeps recent temp dirs: no second copy of the weights
    shutil.rmtree(dist)
    # After the install: the dependencies come from the host's site dirs, as plain paths.
    (site_packages / "zz_host_site.pth").write_text("\n".join(_host_site_dirs()) + "\n")

    cwd = base / "cwd"
    cwd.mkdir()
    data_dir = base / "data"
    return WheelVenv(
        python=python,
        d4c=venv / "bin" / "d4c",
        site_packages=site_packages,
        cwd=cwd,
        data_dir=data_dir,
        env=_clean_env(D4C_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1"),
    )


# Run by the venv's interpreter: where everything resolves, and every module of the wheel
# imports (a module or package data the wheel lacks fails here, not in production).
PROBE = """
import importlib, json, pkgutil, sys
from importlib.metadata import distribution, entry_points
import app, d4c_core, worker
from app.db import migrate
modules, failed = [], {}
for pkg in (app, worker, d4c_core):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        try:
            modules.append(importlib.import_module(info.name).__file__)
        except Exception as e:
            failed[info.name] = repr(e)
print(json.dumps({
    "files": [app.__file__, d4c_core.__file__, worker.__file__, migrate.__file__,
              str(migrate.migrations_dir())] + modules,
    "failed": failed,
    "sys_path": sys.path,
    "meta_path": [getattr(f, "__module__", "") + "." + getattr(f, "__name__", type(f).__name__)
                  for f in sys.meta_path],
    "dist": str(distribution("d4c-service").locate_file("")),
    "plugins": sorted(ep.value for ep in entry_points(group="d4c.cli")),
}))
"""


def test_wheel_imports_only_from_its_own_site_packages(wheel_venv: WheelVenv) -> None:
    proc = wheel_venv.run(wheel_venv.python, "-c", PROBE)
    assert proc.returncode == 0, proc.stderr
    probe = json.loads(proc.stdout.splitlines()[-1])
    assert probe["failed"] == {}
    site_packages = wheel_venv.site_packages.resolve()
    assert len(probe["files"]) > 20
    for file in probe["files"]:
        assert Path(file).resolve().is_relative_to(site_packages), file
    assert not any("__editable__" in f for f in probe["meta_path"]), probe["meta_path"]
    assert not any(p and Path(p).resolve().is_relative_to(ROOT) for p in probe["sys_path"])
    assert Path(probe["dist"]).resolve() == site_packages
    assert probe["plugins"] == ["app.cli:register", "worker.cli:register"]

    help_ = wheel_venv.run(wheel_venv.d4c, "--help")
    assert help_.returncode == 0, help_.stderr
    for command in ("serve", "worker", "db", "keys", "submit"):
        assert command in help_.stdout, command
    for command in ("serve", "worker"):
        sub = wheel_venv.run(wheel_venv.d4c, command, "--help")
        assert sub.returncode == 0 and "usage: d4c" in sub.stdout, sub.stderr


def test_wheel_db_upgrade_and_keys_create_on_sqlite(wheel_venv: WheelVenv) -> None:
    upgrade = wheel_venv.run(wheel_venv.d4c, "db", "upgrade")
    assert upgrade.returncode == 0, upgrade.stderr
    head = ScriptDirectory(str(ROOT / "app" / "db" / "migrations")).get_current_head()
    db = wheel_venv.data_dir / "d4c.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(head,)]

    keys = wheel_venv.run(wheel_venv.d4c, "keys", "create", "--tenant", "t")
    assert keys.returncode == 0, keys.stderr
    key = keys.stdout.strip().splitlines()[-1]
    with sqlite3.connect(db) as conn:
        stored = conn.execute(
            "SELECT k.key_hash FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE t.name = 't'"
        ).fetchall()
    assert stored == [(hash_key(key),)]  # the printed last line is the key that was stored


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_wheel_serve_answers(wheel_venv: WheelVenv) -> None:
    """`d4c serve` (embedded default: migrates SQLite, starts the in-process worker) comes up."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(wheel_venv.d4c), "serve", "--port", str(port)],
        cwd=wheel_venv.cwd,
        env=wheel_venv.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "d4c serve did not answer /healthz"
                time.sleep(0.5)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
