"""The deployment files: `docker compose config` accepts docker-compose.yml, and the compose
services and Dockerfiles have the structure the deployment relies on.

No Docker engine runs here: `config` only parses, interpolates and validates (Debian's
`docker-compose` or the `docker compose` plugin both do without an engine). Nothing here
builds or runs an image.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILES = {
    name: ROOT / "docker" / f"{name}.Dockerfile" for name in ("api", "worker", "worker-cpu")
}
PASSWORD = "pw-for-config-test-7f3a"  # what the test exports; must not be in any file
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE|CREDENTIAL", re.I)


def compose_command() -> list[str] | None:
    """`docker compose` (v2 plugin) if it works, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def run_config(env_extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            "(apt-get install -y docker-compose)"
        )
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"} | env_extra
    return subprocess.run(
        [*cmd, "-f", str(COMPOSE_FILE), "--profile", "cpu", "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    proc = run_config({"POSTGRES_PASSWORD": PASSWORD})
    assert proc.returncode == 0, proc.stderr
    parsed = yaml.safe_load(proc.stdout)
    assert isinstance(parsed, dict)
    return parsed


def service(config: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(config["services"][name])


def health_test(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def conditions(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    assert isinstance(deps, dict), "depends_on must use the long form with conditions"
    return {name: d["condition"] for name, d in deps.items()}


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """target -> source of each volume, whichever syntax the compose version prints."""
    out: dict[str, str] = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v["source"], v["target"]
        out[target] = source
    return out


def test_services(config: dict[str, Any]) -> None:
    expected = {"api", "worker", "worker-cpu", "redis", "postgres", "migrate"}
    assert set(config["services"]) == expected
    assert service(config, "worker-cpu")["profiles"] == ["cpu"]


def test_migration_runs_once_before_the_api(config: dict[str, Any]) -> None:
    migrate = service(config, "migrate")
    assert migrate["command"] == ["d4c", "db", "upgrade"]
    assert str(migrate.get("restart", "no")) == "no"
    assert conditions(migrate) == {"postgres": "service_healthy"}
    backends = {
        "migrate": "service_completed_successfully",
        "postgres": "service_healthy",
        "redis": "service_healthy",
    }
    for name in ("api", "worker", "worker-cpu"):
        assert conditions(service(config, name)) == backends, name


def test_healthchecks(config: dict[str, Any]) -> None:
    assert "/readyz" in health_test(service(config, "api"))
    assert "pg_isready" in health_test(service(config, "postgres"))
    assert "redis-cli ping" in health_test(service(config, "redis"))
    for name in ("worker", "worker-cpu"):
        assert "healthcheck.py worker" in health_test(service(config, name))
    # The compose probes call a script every image ships.
    assert (ROOT / "docker" / "healthcheck.py").is_file()
    for path in DOCKERFILES.values():
        assert "COPY docker/healthcheck.py ./docker/healthcheck.py" in path.read_text()


def test_gpu_worker_reservation_and_scaling(config: dict[str, Any]) -> None:
    worker = service(config, "worker")
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert int(device["count"]) == 1
    for name in ("worker", "worker-cpu"):
        svc = service(config, name)
        # `--scale worker=N` needs no fixed name and no host port per replica.
        assert "container_name" not in svc and "ports" not in svc, name
        assert svc["command"] == ["d4c", "worker"]
    assert "deploy" not in service(config, "worker-cpu")


def test_redis_never_evicts_and_persists(config: dict[str, Any]) -> None:
    redis = service(config, "redis")
    cmd = redis["command"]
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert mounts(redis)["/data"] == "redisdata"
    assert "redisdata" in config["volumes"]


def test_postgres_volume(config: dict[str, Any]) -> None:
    pg = service(config, "postgres")
    assert mounts(pg)["/var/lib/postgresql/data"] == "pgdata"
    assert "pgdata" in config["volumes"]
    assert pg["environment"]["POSTGRES_PASSWORD"] == PASSWORD  # from the environment


def test_service_env_and_shared_data(config: dict[str, Any]) -> None:
    for name in ("api", "worker", "worker-cpu", "migrate"):
        env = service(config, name)["environment"]
        assert env["D4C_DATABASE_URL"].startswith("postgresql+psycopg://d4c:"), name
        assert env["D4C_DATABASE_URL"].endswith("@postgres:5432/d4c"), name
        assert env["D4C_BROKER_URL"].startswith("redis://redis:6379/"), name
        assert env["D4C_DATA_DIR"] == "/data", name
    # One artifacts/checkpoints/work volume for the API and every worker.
    sources = {mounts(service(config, n))["/data"] for n in ("api", "worker", "worker-cpu")}
    assert sources == {"d4c-data"}
    assert "d4c-data" in config["volumes"]


def test_no_password_in_the_compose_file() -> None:
    """The password is interpolated from the environment; without it `config` refuses."""
    text = COMPOSE_FILE.read_text()
    assert PASSWORD not in text
    # No literal value: the key and the URL only ever interpolate ${POSTGRES_PASSWORD...}.
    assert re.search(r"^\s*POSTGRES_PASSWORD:\s*(?!\$\{POSTGRES_PASSWORD)\S", text, re.M) is None
    assert re.search(r"postgresql\+psycopg://d4c:(?!\$\{POSTGRES_PASSWORD)", text) is None
    proc = run_config({})
    assert proc.returncode != 0
    assert "POSTGRES_PASSWORD" in proc.stderr


# ---- Dockerfiles: static checks (nothing is built here) ---------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    out = []
    for line in joined:
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


def torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.replace(" ", "").startswith("torch==")]
    return pin.replace(" ", "")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_non_root_healthcheck_no_secrets(name: str) -> None:
    path = DOCKERFILES[name]
    final = final_stage(path)
    users = [args for op, args in final if op == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), name
    assert any(op == "HEALTHCHECK" for op, _ in final), name
    assert len([op for op, _ in instructions(path) if op == "FROM"]) >= 2, "multi-stage"
    for op, args in instructions(path):
        if op in ("ENV", "ARG"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]:
                assert not SECRET_NAME.search(key), f"{name}: {op} {key} looks like a secret"
        if op in ("COPY", "ADD"):
            assert ".env" not in args.split() and "id_rsa" not in args, f"{name}: {op} {args}"
    text = path.read_text()
    assert PASSWORD not in text and "postgresql+psycopg://" not in text
    assert torch_pin() in text  # the image installs exactly the pinned torch


def test_worker_images_torch_builds() -> None:
    gpu = DOCKERFILES["worker"].read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", gpu, re.M)
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", gpu)
    for name in ("api", "worker-cpu"):
        text = DOCKERFILES[name].read_text()
        assert "download.pytorch.org/whl/cpu" in text and "nvidia/cuda" not in text, name


def test_images_install_the_package_not_the_tree() -> None:
    """A regular install: the runtime stage carries the venv, not the source tree (the Alembic
    scripts ship in the package, so nothing needs the checkout beside it)."""
    for name, path in DOCKERFILES.items():
        text = path.read_text()
        assert "pip install --no-deps . " in text and "install --no-deps -e" not in text, name
        assert "COPY --from=build /opt/d4c /opt/d4c" not in text, name
        copies = [args for op, args in instructions(path) if op == "COPY"]
        assert not any("migrations" in args or "alembic.ini" in args for args in copies), name


def test_dockerignore_keeps_secrets_and_data_out() -> None:
    entries = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".env", ".env.*", "d4c-data"} <= entries
    # ...but keeps what `pip install .` and the images need (the Alembic scripts are in app/).
    for needed in ("pyproject.toml", "README.md", "app", "d4c_core", "worker", "docker"):
        assert needed not in entries


# ---- the healthcheck script the images run -----------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 503)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_healthcheck_script_http(http_server: str) -> None:
    script = str(ROOT / "docker" / "healthcheck.py")

    def run(*args: str) -> int:
        return subprocess.run([sys.executable, script, *args], timeout=30).returncode

    assert run("http", f"{http_server}/ok") == 0
    assert run("http", f"{http_server}/down") == 1
    assert run("bogus") == 2
