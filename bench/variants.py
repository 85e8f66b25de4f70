"""Many fine-tuned variants on one fleet: 20 variants of the default model (made here, as the
tests make them) served by one entry over 2 replicas holding 4 each, through the default entry
point on loopback.

- cold: the first one-text request to each variant in turn (it loads; past 8, others go);
- vectors: every variant's answer against sentence-transformers on its checkpoint;
- warm: one-text requests to 4 resident variants, alternated with the same requests to the base
  model the same replicas serve (a plain model, no multiplexing), back to back;
- mix: 4 clients, each request to a variant drawn by Zipf's law (s=1.1) over all 20, against the
  same clients on the base model only, alternated.

    python bench/variants.py        # writes docs/benchmarks-variants.md (.json)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.engine.model_files import resolve_model_dir  # noqa: E402
from serve_app.testing.metrics import scraped_total  # noqa: E402
from serve_app.testing.server import free_port, serve_config, start_server  # noqa: E402
from serve_app.testing.texts import TEXTS  # noqa: E402
from serve_app.testing.variants import make_variants  # noqa: E402

QUERY = "what is the capital of France"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def one(client: httpx.Client, model: str, texts: list[str] | str = QUERY) -> tuple[float, list]:
    t = time.perf_counter()
    r = client.post("/v1/embeddings", json={"model": model, "input": texts})
    ms = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code} {r.text}")
    return ms, [d["embedding"] for d in r.json()["data"]]


async def mix(url: str, models: list[str], weights: list[float], requests: int, clients: int,
              seed: int) -> dict[str, float]:
    """``requests`` one-text requests from ``clients`` clients, each to a model drawn with
    ``weights``: requests/s and latency percentiles in ms."""
    rng = random.Random(seed)
    picks = rng.choices(models, weights, k=requests)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        async def client(k: int) -> None:
            for i in range(k, requests, clients):
                t = time.perf_counter()
                r = await c.post("/v1/embeddings", json={"model": picks[i], "input": QUERY})
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code} {r.text}")
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        seconds = time.perf_counter() - t0
    return {"requests": requests, "rps": requests / seconds, "p50_ms": pct(latencies, 50),
            "p99_ms": pct(latencies, 99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variants", type=int, default=20)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--max-loaded", type=int, default=4)
    p.add_argument("--warm", type=int, default=200, help="requests per side in the warm A/B")
    p.add_argument("--mix-requests", type=int, default=400)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-variants.md"))
    a = p.parse_args()
    from sentence_transformers import SentenceTransformer

    names = [f"ft-{i:02d}" for i in range(a.variants)]
    result: dict = {"variants": a.variants, "replicas": a.replicas, "max_loaded": a.max_loaded}
    with tempfile.TemporaryDirectory() as tmp:
        made = make_variants(resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2"),
                             Path(tmp) / "fine-tunes", names)
        reference = {n: SentenceTransformer(str(d), device="cpu").encode(TEXTS)
                     for n, d in made.items()}
        model = {"name": "embedding", "deployment": {"num_replicas": a.replicas, "num_cpus": 1},
                 "variants": {"directory": str(Path(tmp) / "fine-tunes"),
                              "max_loaded": a.max_loaded}}
        with start_server(serve_config(free_port(), {"models": [model]}), Path(tmp)) as server, \
                httpx.Client(base_url=str(server), timeout=120) as c:
            url = str(server)
            for _ in range(20):
                one(c, "embedding")
            result["rss_start_mib"] = server.rss_bytes() / 2**20

            cold = [one(c, n)[0] for n in names]
            load_s = [scraped_total(c, "serve_app_variant_load_seconds_sum", model=n)
                      for n in names]
            result["cold"] = {"request_p50_ms": pct(cold, 50), "request_max_ms": max(cold),
                              "load_p50_ms": pct(load_s, 50) * 1000,
                              "load_max_ms": max(load_s) * 1000}
            result["rss_loaded_mib"] = server.rss_bytes() / 2**20

            worst = {n: float(np.abs(np.array(one(c, n, TEXTS)[1]) - reference[n]).max())
                     for n in names}
            result["vectors"] = {"max_abs_diff": max(worst.values()),
                                 "equal": sum(d <= 1e-5 for d in worst.values())}

            warm = names[-a.max_loaded:]
            zipf = [1 / (k + 1) ** 1.1 for k in range(len(names))]
            slots = a.replicas * a.max_loaded
            result["mix_static_miss"] = 1 - sum(sorted(zipf)[-slots:]) / sum(zipf)
            rounds = []
            for r in range(a.rounds):
                for n in warm * 2:  # resident again after the previous round's mix
                    one(c, n)
                base_ms, variant_ms = [], []
                loads = scraped_total(c, "serve_app_variant_loads_total")
                for i in range(a.warm):
                    base_ms.append(one(c, "embedding")[0])
                    variant_ms.append(one(c, warm[i % len(warm)])[0])
                warm_loads = scraped_total(c, "serve_app_variant_loads_total") - loads
                before = (scraped_total(c, "serve_app_variant_loads_total"),
                          scraped_total(c, "serve_app_variant_evictions_total"))
                mixed = asyncio.run(mix(url, names, zipf, a.mix_requests, 4, seed=r))
                mixed["loads"] = scraped_total(c, "serve_app_variant_loads_total") - before[0]
                mixed["evictions"] = (scraped_total(c, "serve_app_variant_evictions_total")
                                      - before[1])
                plain = asyncio.run(mix(url, ["embedding"], [1.0], a.mix_requests, 4, seed=r))
                rounds.append({"warm_loads": warm_loads,
                               "warm_base_p50_ms": pct(base_ms, 50),
                               "warm_variant_p50_ms": pct(variant_ms, 50),
                               "warm_base_p99_ms": pct(base_ms, 99),
                               "warm_variant_p99_ms": pct(variant_ms, 99),
                               "mix": mixed, "plain": plain})
                print(json.dumps(rounds[-1]), flush=True)
            result["rounds"] = rounds
    write(result, Path(a.out))


def write(r: dict, out: Path) -> None:
    cold, vec = r["cold"], r["vectors"]
    lines = [
        "## Fine-tuned variants on one fleet", "",
        f"`python bench/variants.py`: {r['variants']} variants of all-MiniLM-L6-v2 (its weights "
        "moved by seeded noise, as the tests make them) served by one model entry over "
        f"{r['replicas']} replicas of 1 CPU each, holding {r['max_loaded']} variants each beside "
        "the base, through the default entry point on loopback (2 cores, the load generator on "
        "them too).", "",
        f"- **Cold load**: the first one-text request to each variant in turn, every one a load "
        f"(from the 9th on, each evicts the least recently used): p50 "
        f"{cold['request_p50_ms']:.0f} ms, worst {cold['request_max_ms']:.0f} ms at the client; "
        f"the load itself (read the checkpoint, check it against the base) p50 "
        f"{cold['load_p50_ms']:.0f} ms, worst {cold['load_max_ms']:.0f} ms "
        "(`serve_app_variant_load_seconds`).",
        f"- **Vectors**: {vec['equal']} of {r['variants']} variants equal sentence-transformers "
        f"on their own checkpoint within 1e-5 (largest difference {vec['max_abs_diff']:.1e}), "
        "4 texts each, one of 256 tokens.",
        f"- **Memory**: the whole stack {r['rss_start_mib']:.0f} MiB with the two bases, "
        f"{r['rss_loaded_mib']:.0f} MiB holding {r['replicas'] * r['max_loaded']} variants.", "",
        "Warm latency: one-text requests back to back, each to the base model or to one of 4 "
        "resident variants, alternated. Mix: 4 clients, "
        "each request to one of the 20 variants drawn by Zipf's law (s=1.1), against the same "
        "clients on the base only. Every variant held where it is asked for would still miss "
        f"{r['mix_static_miss']:.0%} of the mix's requests (the {r['replicas'] * r['max_loaded']} "
        "most asked for held for good); each miss is a load.", "",
        "| round | warm p50: base / variant | warm p99: base / variant | loads while warm | "
        "mix: req/s, p50, p99 | mix: loads (share of requests), evictions | "
        "base only: req/s, p50, p99 | mix / base req/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, x in enumerate(r["rounds"], 1):
        m, b = x["mix"], x["plain"]
        lines.append(
            f"| {i} | {x['warm_base_p50_ms']:.1f} / {x['warm_variant_p50_ms']:.1f} ms | "
            f"{x['warm_base_p99_ms']:.1f} / {x['warm_variant_p99_ms']:.1f} ms | "
            f"{x['warm_loads']:.0f} | {m['rps']:.0f}, {m['p50_ms']:.0f} ms, {m['p99_ms']:.0f} ms | "
            f"{m['loads']:.0f} ({m['loads'] / m['requests']:.0%}), {m['evictions']:.0f} | "
            f"{b['rps']:.0f}, {b['p50_ms']:.0f} ms, {b['p99_ms']:.0f} ms | "
            f"{m['rps'] / b['rps']:.2f}x |")
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(r, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
