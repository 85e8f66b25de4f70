"""Queries beside bulk indexing: one client sends one-text queries back to back while 4 clients
send 32 long texts (~110 tokens) each, through the default entry point (configs/local.yaml's
shape). The bulk requests go unmarked, then at a low priority level (10); the query's p50 is
compared with one bulk forward pass (the replica's mean, from its V2 statistics) and with the
query alone.

    python bench/priority.py        # writes docs/benchmarks-priority.md (.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import texts_for  # noqa: E402
from serve_app.testing.server import free_port, serve_config, start_server  # noqa: E402

BULK_CLIENTS = 4
LOW = 10


async def scenario(url: str, duration: float, bulk_level: int | None, bulk: bool = True
                   ) -> dict[str, float]:
    """The query's latencies and the bulk requests' forward-pass times, in ms."""
    query_ms: list[float] = []
    pass_ms: list[float] = []
    stop = time.perf_counter() + duration
    async with aiohttp.ClientSession(base_url=url) as session:
        async def post(texts: list[str], level: int | None) -> float:
            body: dict = {"model": "embedding", "input": texts, "encoding_format": "base64"}
            if level is not None:
                body["priority"] = level
            async with session.post("/v1/embeddings", json=body) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                return float(r.headers["x-inference-time"])

        async def bulk_client(c: int) -> None:
            i = 0
            while time.perf_counter() < stop:
                ms = await post(texts_for("W4", (c * 100_000 + i) * 32), bulk_level)
                pass_ms.append(ms)
                i += 1

        async def query_client() -> None:
            await asyncio.sleep(1.0)  # let the bulk load build up first
            i = 0
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await post([f"what is the capital of country number {i}"], None)
                query_ms.append((time.perf_counter() - t) * 1000)
                i += 1

        clients = [bulk_client(c) for c in range(BULK_CLIENTS)] if bulk else []
        await asyncio.gather(query_client(), *clients)
    return {"query_p50_ms": statistics.median(query_ms), "queries": len(query_ms),
            "bulk_inference_ms": statistics.median(pass_ms) if pass_ms else 0.0,
            "bulk_requests": len(pass_ms)}


def pass_ms(url: str) -> dict[int, tuple[int, float]]:
    """Forward passes so far by batch size: (count, total ms), from the V2 statistics."""
    import httpx

    stats = httpx.get(f"{url}/v2/models/embedding/stats", timeout=30).json()
    return {b["batch_size"]: (b["compute_infer"]["count"], b["compute_infer"]["ns"] / 1e6)
            for b in stats["model_stats"][0]["batch_stats"]}


def bulk_pass_ms(before: dict[int, tuple[int, float]], after: dict[int, tuple[int, float]]
                 ) -> float:
    """The mean forward pass of 16 or more texts between two statistics snapshots."""
    count = sum(after[k][0] - before.get(k, (0, 0.0))[0] for k in after if k >= 16)
    total = sum(after[k][1] - before.get(k, (0, 0.0))[1] for k in after if k >= 16)
    return total / count if count else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-priority.md"))
    a = p.parse_args()
    runs: list[dict[str, dict[str, float]]] = []
    model = {"name": "embedding", "deployment": {"num_replicas": 1, "num_cpus": "all"}}
    with tempfile.TemporaryDirectory() as tmp, start_server(
            serve_config(free_port(), {"models": [model]}, grpc_port=free_port()),
            Path(tmp)) as server:
        url = str(server)
        asyncio.run(scenario(url, 4.0, LOW))  # warm up
        for _ in range(a.rounds):  # alternated, so drift hits both alike
            run = {"alone": asyncio.run(scenario(url, a.duration / 2, None, bulk=False)),
                   "unmarked": asyncio.run(scenario(url, a.duration, None))}
            before = pass_ms(url)
            run["low"] = asyncio.run(scenario(url, a.duration, LOW))
            run["low"]["bulk_pass_ms"] = bulk_pass_ms(before, pass_ms(url))
            runs.append(run)
            print(json.dumps(runs[-1]), flush=True)
    lines = [
        "## Queries beside bulk indexing", "",
        f"`python bench/priority.py`: one client sends one-text queries back to back while "
        f"{BULK_CLIENTS} clients send 32 long texts (~110 tokens) each, through the default "
        "entry point (configs/local.yaml's shape, 2 cores, the load generator on them too). "
        f"Bulk unmarked, then at priority {LOW}; queries at the default level. A bulk pass is "
        "the mean forward pass of 16 or more texts during the low-priority case, from "
        "`/v2/models/embedding/stats` (two passes run at once, each on one of the 2 threads). "
        "Rounds alternate the cases.", "",
        "| round | query alone p50 | bulk pass | query p50, bulk unmarked | query p50, bulk at "
        f"{LOW} | target: pass + 5 ms | unmarked / low |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        bulk_pass = r["low"]["bulk_pass_ms"]
        lines.append(
            f"| {i} | {r['alone']['query_p50_ms']:.0f} ms | {bulk_pass:.0f} ms | "
            f"{r['unmarked']['query_p50_ms']:.0f} ms | {r['low']['query_p50_ms']:.0f} ms | "
            f"{bulk_pass + 5:.0f} ms | "
            f"{r['unmarked']['query_p50_ms'] / r['low']['query_p50_ms']:.1f}x |")
    out = Path(a.out)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(runs, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
