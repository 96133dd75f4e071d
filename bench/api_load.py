"""HTTP load benchmark: authenticated ``GET /jobs/{id}`` on PostgreSQL vs a bare baseline.

    python bench/api_load.py [--duration 10] [--connections 64 16] [--out FILE]
    python bench/api_load.py --quick          # 2 s runs: checks the harness, not the numbers

Why this shape: the issue's target (>= 1,500 req/s at 64 connections, p99 <= 50 ms at 16) is
relative to what the machine can do at all, so the same run also measures a bare FastAPI +
asyncpg single-row lookup (no auth, no ORM, no middleware), interleaved with the API runs so
background load hits both alike. The API runs as deployed: ``d4c serve`` (one uvicorn process,
uvloop/httptools when installed, JSON logs, the latency histogram) on a fresh migrated
PostgreSQL database with a Redis broker URL, so no embedded worker shares its process. The
load generator is a separate process: ``wrk`` when on PATH, else a small asyncio HTTP/1.1
keep-alive client in its own process (named in the output). Server CPU per request (from
/proc) is reported too: on a busy machine it moves less than throughput does.

Writes a markdown section to ``bench/results/api_load.md`` (and stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from service_harness import (
    ROOT,
    BenchError,
    Proc,
    create_key,
    machine_lines,
    pg_database,
    pg_version,
    redis_database,
    run_d4c,
    service_env,
    wait_http,
    write_section,
)

from worker.client import free_port

TARGET_RPS_AT_64 = 1500.0
TARGET_P99_MS_AT_16 = 50.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# The bare baseline server (run in its own process by `api_load.py serve-bare`)


def serve_bare(dsn: str, port: int) -> None:
    """FastAPI + an asyncpg pool answering ``GET /jobs/{id}`` with one row: the floor of what
    any authenticated, ORM-backed endpoint on this stack can cost."""
    import asyncpg
    import uvicorn
    from fastapi import FastAPI, HTTPException

    pool: list[asyncpg.Pool] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        async def init(conn: asyncpg.Connection) -> None:
            for typ in ("json", "jsonb"):
                await conn.set_type_codec(
                    typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                )

        pool.append(await asyncpg.create_pool(dsn, min_size=4, max_size=20, init=init))
        yield
        await pool[0].close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        row = await pool[0].fetchrow(
            "SELECT id, state, stage, progress, model, recipe, eval_task, metrics, error, "
            "cancel_requested, attempts, created_at, started_at, finished_at "
            "FROM jobs WHERE id = $1",
            job_id,
        )
        if row is None:
            raise HTTPException(404)
        return dict(row)

    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


# ---------------------------------------------------------------------------------------------
# Load generators


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int  # non-2xx responses plus socket errors
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    """Pull requests, duration, errors and the latency percentiles out of ``wrk --latency``."""
    pct = {p: _ms(v) for p, v in re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M)}
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    lat = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    if not done or len(pct) < 3 or not lat:
        raise BenchError(f"could not parse wrk output:\n{out}")
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return LoadResult(
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1e3,
        errors=errors,
        p50_ms=pct["50"],
        p90_ms=pct["90"],
        p99_ms=pct["99"],
        max_ms=_ms(lat.group(1)),
    )


async def _py_conn(
    host: str, port: int, raw: bytes, stop_at: float, lat: list[float], errs: list[int]
) -> None:
    """One keep-alive connection sending ``raw`` back to back until ``stop_at``."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m:
                await reader.readexactly(int(m.group(1)))
            lat.append(time.perf_counter() - t0)
            if not 200 <= status < 400:
                errs[0] += 1
    except (OSError, asyncio.IncompleteReadError):
        errs[0] += 1
    finally:
        writer.close()


def py_loadgen(url: str, headers: list[str], connections: int, duration: float) -> None:
    """Last-resort generator (no wrk on the machine): asyncio, raw HTTP/1.1, one process.
    Prints a JSON ``LoadResult``. It is slower than wrk and eats CPU the server wants, so its
    numbers understate the server."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    u = httpx.URL(url)
    host, port = u.host, u.port or 80
    lines = [f"GET {u.raw_path.decode()} HTTP/1.1", f"Host: {host}:{port}", *headers]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    lat: list[float] = []
    errs = [0]

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(
            *(_py_conn(host, port, raw, t0 + duration, lat, errs) for _ in range(connections))
        )
        return time.perf_counter() - t0

    seconds = asyncio.run(main())
    lat.sort()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [0.0] * 99
    top = lat[-1] if lat else 0.0
    res = LoadResult(len(lat), seconds, errs[0], q[49] * 1e3, q[89] * 1e3, q[98] * 1e3, top * 1e3)
    print(json.dumps(res.__dict__))


def generator_name(choice: str) -> str:
    if choice == "auto":
        return "wrk" if shutil.which("wrk") else "python"
    if choice == "wrk" and not shutil.which("wrk"):
        raise BenchError("wrk is not on PATH (apt-get install -y wrk)")
    return choice


def drive(
    gen: str, url: str, key: str | None, connections: int, threads: int, seconds: float
) -> LoadResult:
    """Run the load generator in its own process against ``url`` for ``seconds``."""
    header = [f"Authorization: Bearer {key}"] if key else []
    if gen == "wrk":
        wrk_s = max(1, round(seconds))  # wrk takes whole seconds
        cmd = ["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{wrk_s}s"]
        cmd += ["--latency", "--timeout", "10s"]
        for h in header:
            cmd += ["-H", h]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
        return parse_wrk(out)
    cmd = [sys.executable, __file__, "loadgen", "--url", url]
    cmd += ["--connections", str(connections), "--duration", str(seconds)]
    for h in header:
        cmd += ["--header", h]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def cpu_seconds(pid: int) -> float:
    """user+system CPU of process ``pid`` so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ---------------------------------------------------------------------------------------------
# Fixture data


def insert_job(db_url: str, tenant_name: str) -> str:
    """A finished job row of the size real ones have (full recipe, metrics with timings), owned
    by ``tenant_name``'s tenant, so serialization costs what it costs in production."""
    from sqlalchemy import select

    from app.core.config import Settings
    from app.db.models import Job, Tenant
    from app.db.session import sync_sessionmaker
    from d4c_core.recipe import CalibrationRecipe, QuantRecipe, Recipe

    recipe = Recipe(
        quant=QuantRecipe(weight_bits=4, act_bits=8, recon_iters=200),
        calibration=CalibrationRecipe(method="noise", num_images=128),
    ).to_dict()
    now = datetime.now(UTC)
    metrics = {
        "zero_shot": {
            "task": "object10",
            "fp": {"top1": 81.98, "top5": 98.72},
            "quantized": {"top1": 80.1, "top5": 98.3},
            "delta_top1": -1.88,
        },
        "embedding_cosine": {"image": 0.991, "text": 0.998},
        "size_bytes": {"fp32": 23_000_000, "quantized": 3_300_000},
        "timings": {s: 1.5 for s in ("load", "calibration", "range_init", "reconstruct", "export")},
        "resumed_units": 0,
    }
    with sync_sessionmaker(Settings(database_url=db_url))() as db, db.begin():
        tenant_id = db.scalar(select(Tenant.id).where(Tenant.name == tenant_name))
        job = Job(
            tenant_id=tenant_id,
            state="succeeded",
            stage="done",
            progress=1.0,
            model={"arch": "d4c-tiny-vit", "pretrained": "builtin"},
            recipe=recipe,
            eval_task="object10",
            request_hash=secrets.token_hex(32),
            metrics=metrics,
            attempts=1,
            created_at=now - timedelta(minutes=3),
            started_at=now - timedelta(minutes=3),
            finished_at=now,
        )
        db.add(job)
        db.flush()
        return job.id


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class Row:
    server: str
    connections: int
    result: LoadResult
    cpu_us_per_req: float


def measure(
    gen: str, proc: Proc, url: str, key: str | None, conns: int, threads: int, args: Any
) -> Row:
    if args.warmup > 0:
        drive(gen, url, key, conns, threads, args.warmup)
    c0 = cpu_seconds(proc.pid)
    res = drive(gen, url, key, conns, threads, args.duration)
    cpu = cpu_seconds(proc.pid) - c0
    return Row("", conns, res, cpu / res.requests * 1e6 if res.requests else float("nan"))


def sanity_check(base: str, job_id: str, key: str) -> None:
    """The endpoint under load must be the real one: 200 with the job for its owner, 401
    without a key. A benchmark of error responses would be worthless."""
    ok = httpx.get(f"{base}/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
    if ok.status_code != 200 or ok.json().get("id") != job_id:
        raise BenchError(f"GET /jobs/{job_id} answered {ok.status_code}: {ok.text[:300]}")
    anon = httpx.get(f"{base}/jobs/{job_id}")
    if anon.status_code != 401:
        raise BenchError(f"GET /jobs/{job_id} without a key answered {anon.status_code}")


def run(args: argparse.Namespace) -> list[Row]:
    gen = generator_name(args.loadgen)
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="d4c-api-load-") as tmp,
        pg_database() as db_url,
        redis_database() as broker_url,
    ):
        env = service_env(database_url=db_url, broker_url=broker_url, data_dir=Path(tmp) / "data")
        run_d4c(env, "db", "upgrade")
        key = create_key(env, "bench")
        job_id = insert_job(db_url, "bench")
        procs: list[Proc] = []
        try:
            api_port, bare_port = free_port(), free_port()
            api = Proc(
                [sys.executable, "-m", "d4c_core.cli", "serve", "--port", str(api_port)],
                env,
                Path(tmp) / "api.log",
            )
            procs.append(api)
            bare: Proc | None = None
            if not args.no_bare:
                dsn = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
                bare_cmd = [sys.executable, __file__, "serve-bare", "--dsn", dsn]
                bare = Proc([*bare_cmd, "--port", str(bare_port)], env, Path(tmp) / "bare.log")
                procs.append(bare)
            api_base, bare_base = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{bare_port}"
            wait_http(f"{api_base}/healthz", api)
            sanity_check(api_base, job_id, key)
            if bare is not None:
                wait_http(f"{bare_base}/healthz", bare)
                r = httpx.get(f"{bare_base}/jobs/{job_id}")
                if r.status_code != 200:
                    raise BenchError(f"bare server answered {r.status_code}: {r.text[:300]}")
            for conns in args.connections:
                targets: list[tuple[str, Proc, str, str | None]] = []
                if bare is not None:
                    targets.append(("bare FastAPI + asyncpg", bare, bare_base, None))
                targets.append(("d4c API (auth, tenancy)", api, api_base, key))
                for _ in range(args.rounds):
                    for name, proc, base, k in targets:
                        url = f"{base}/jobs/{job_id}"
                        row = measure(gen, proc, url, k, conns, args.threads, args)
                        row.server = name
                        rows.append(row)
                        r = row.result
                        print(
                            f"{name:24s} c={conns:<3d} {r.rps:8.0f} req/s  p50 {r.p50_ms:6.2f}  "
                            f"p99 {r.p99_ms:6.2f} ms  errors {r.errors}  "
                            f"server CPU {row.cpu_us_per_req:5.0f} us/req",
                            file=sys.stderr,
                        )
            for p in procs:
                if not p.alive():
                    raise BenchError(f"{p.args} died during the run:\n{p.log_tail()}")
        finally:
            for p in procs:
                p.stop()
    args.generator = gen
    return rows


def report(rows: list[Row], args: argparse.Namespace, machine: list[str], pg: str) -> str:
    cmd = "python bench/api_load.py " + " ".join(args.argv)
    gen = "python asyncio (separate process)"
    if args.generator == "wrk":
        gen = f"wrk {_wrk_version()}".strip()
    lines = [
        "## API load: authenticated `GET /jobs/{id}` on PostgreSQL",
        "",
        f"- command: `{cmd.strip()}`",
        *machine,
        f"- load average at end: {os.getloadavg()[0]:.2f}",
        f"- PostgreSQL {pg} (127.0.0.1, same machine); load generator: {gen}, "
        f"{args.threads} thread(s), same machine; {args.duration:g} s per run after "
        f"{args.warmup:g} s warm-up; {args.rounds} round(s), servers interleaved",
        "- API: `d4c serve` (1 uvicorn process, uvloop/httptools when installed, JSON logs to a "
        "file, latency histogram; successful reads are counted, not logged); baseline: bare "
        "FastAPI + asyncpg pool, one `SELECT ... WHERE id = $1`",
        "- server CPU: user+system CPU of the server process per request (PostgreSQL and the "
        "load generator not counted)",
        "",
        "| server | connections | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | "
        "server CPU µs/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row.result
        lines.append(
            f"| {row.server} | {row.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
            f"{r.p90_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} | {r.errors} | "
            f"{row.cpu_us_per_req:,.0f} |"
        )
    lines.append("")
    api = [r for r in rows if r.server.startswith("d4c")]
    bare = [r for r in rows if r.server.startswith("bare")]
    for conns, verdict in ((64, "rps"), (16, "p99")):
        a = [r.result for r in api if r.connections == conns]
        if not a:
            continue
        b = [r.result for r in bare if r.connections == conns]
        best_rps = max(x.rps for x in a)
        ratio = f" ({best_rps / max(x.rps for x in b):.0%} of the bare baseline)" if b else ""
        if verdict == "rps":
            ok = best_rps >= TARGET_RPS_AT_64
            lines.append(
                f"- target ≥ {TARGET_RPS_AT_64:,.0f} req/s at 64 connections: "
                f"{best_rps:,.0f}{ratio} — {'met' if ok else 'NOT met'}"
            )
        else:
            p99 = min(x.p99_ms for x in a)
            ok = p99 <= TARGET_P99_MS_AT_16
            lines.append(
                f"- target p99 ≤ {TARGET_P99_MS_AT_16:g} ms at 16 connections: "
                f"{p99:.1f} ms{ratio} — {'met' if ok else 'NOT met'}"
            )
    if any(r.result.errors for r in rows):
        lines.append("- WARNING: some requests failed (see errors): the numbers are not valid")
    return "\n".join(lines) + "\n"


def _wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    m = re.search(r"wrk (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-bare"]:
        p = argparse.ArgumentParser()
        p.add_argument("--dsn", required=True)
        p.add_argument("--port", type=int, required=True)
        a = p.parse_args(argv[1:])
        serve_bare(a.dsn, a.port)
        return 0
    if argv[:1] == ["loadgen"]:
        p = argparse.ArgumentParser()
        p.add_argument("--url", required=True)
        p.add_argument("--header", action="append", default=[])
        p.add_argument("--connections", type=int, required=True)
        p.add_argument("--duration", type=float, required=True)
        a = p.parse_args(argv[1:])
        py_loadgen(a.url, a.header, a.connections, a.duration)
        return 0

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load first")
    p.add_argument("--connections", type=int, nargs="+", default=[64, 16])
    p.add_argument("--rounds", type=int, default=1, help="repeat each (server, connections)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (2 cores: 1 leaves one)")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--no-bare", action="store_true", help="skip the bare baseline")
    p.add_argument("--quick", action="store_true", help="2 s runs, 1 s warm-up (harness check)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api_load.md")
    args = p.parse_args(argv)
    args.argv = argv
    if args.quick:
        args.duration, args.warmup = 2.0, 1.0
    machine = machine_lines()
    rows = run(args)
    write_section(args.out, report(rows, args, machine, pg_version()))
    return 1 if any(r.result.errors for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
