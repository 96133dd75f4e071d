"""Load generator: N concurrent ``POST /jobs`` at once, from this separate process.

    python bench/post_burst.py --url URL --keys-file KEYS --body-file BODY [--requests 200]

Requests go out together (one connection each) and are spread round-robin over the API keys
in KEYS (one per line), so per-tenant limits are exercised the way many pipelines would hit
them. Prints one JSON object: the count per status, throughput over the burst, latency
percentiles, the accepted job ids per key index, and every response that was neither a 202
nor a 429 with ``Retry-After`` (``unexpected``; a correct service has none). Only stdlib and
httpx: the generator shares nothing with the server it loads.

``tests/service/test_load_burst.py`` runs it against a real API and workers and checks that
every accepted job finishes exactly once; ``bench/faults.py`` records its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a reported p99 is a latency that occurred)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


async def _one(
    client: httpx.AsyncClient, key: str, body: dict[str, Any], start: asyncio.Event
) -> dict[str, Any]:
    await start.wait()
    t0 = time.perf_counter()
    try:
        r = await client.post("/jobs", json=body, headers={"Authorization": f"Bearer {key}"})
    except httpx.HTTPError as e:
        return {"status": 0, "seconds": time.perf_counter() - t0, "error": repr(e)}
    out: dict[str, Any] = {"status": r.status_code, "seconds": time.perf_counter() - t0}
    if r.status_code == 202:
        out["id"] = r.json()["id"]
    elif r.status_code == 429:
        out["retry_after"] = r.headers.get("retry-after")
    else:
        out["body"] = r.text[:300]
    return out


async def burst(url: str, keys: list[str], body: dict[str, Any], n: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        start = asyncio.Event()
        tasks = [
            asyncio.create_task(_one(client, keys[i % len(keys)], body, start)) for i in range(n)
        ]
        await asyncio.sleep(0.2)  # every task is waiting on the event
        t0 = time.perf_counter()
        start.set()
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    accepted: dict[str, list[str]] = {}
    for i, r in enumerate(results):
        if "id" in r:
            accepted.setdefault(str(i % len(keys)), []).append(r["id"])
    unexpected = [
        r
        for r in results
        if not (r["status"] == 202 or (r["status"] == 429 and r.get("retry_after")))
    ]
    latencies_ms = [r["seconds"] * 1000 for r in results]
    return {
        "requests": n,
        "keys": len(keys),
        "statuses": statuses,
        "wall_s": wall,
        "throughput_rps": n / wall,
        "latency_ms": {
            "p50": statistics.median(latencies_ms),
            "p99": percentile(latencies_ms, 99),
            "max": max(latencies_ms),
        },
        "accepted": accepted,
        "unexpected": unexpected,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--keys-file", type=Path, required=True, help="API keys, one per line")
    p.add_argument("--body-file", type=Path, required=True, help="the POST /jobs JSON body")
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args(argv)
    keys = [k.strip() for k in args.keys_file.read_text().splitlines() if k.strip()]
    if not keys:
        p.error("no API keys in --keys-file")
    body = json.loads(args.body_file.read_text())
    result = asyncio.run(burst(args.url, keys, body, args.requests))
    print(json.dumps(result))
    return 0 if not result["unexpected"] else 1


if __name__ == "__main__":
    sys.exit(main())
