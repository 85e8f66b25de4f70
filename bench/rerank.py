"""Reranking benchmark: a cross-encoder the size of cross-encoder/ms-marco-MiniLM-L-6-v2 (6 layers,
384 wide; seeded random weights, since none ships offline), in process and served, with
infinity-emb serving the same directory beside it when it is installed.

    python bench/rerank.py                                   # CPU, writes docs/benchmarks-rerank.md
    python bench/rerank.py --device cuda --dtype float16 --out /tmp/rerank-gpu.md

Workloads: R1, one query and 20 documents from one client (latency, p50); R2, one query and 50
documents from each of 4 clients (pairs/s). The ceiling is the engine's forward passes in process
(batches of 32 pairs on every thread), no queue and no server. Each query/document pair is about
46 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve_app.testing.server import free_port, serve_config, start_server

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peers" / "peer_infinity.sh"
QUERY = "how do transformers rank passages for a search query"
DOC = ("Passage {i}: cross-encoders read the query and a candidate document together and give "
       "one relevance score, slower than comparing vectors but more precise on the top results.")
WORKLOADS = {"R1": (20, 1), "R2": (50, 4)}  # documents per request, clients


def docs(n: int, seed: int) -> list[str]:
    return [DOC.format(i=seed + j) for j in range(n)]


def make_reranker(out: Path) -> Path:
    """A MiniLM-L6-sized BERT cross-encoder with seeded random weights and MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from serve_app.engine.model_files import resolve_model_dir

    minilm = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    cfg = BertConfig.from_pretrained(minilm, num_labels=1, max_position_embeddings=512)
    torch.manual_seed(0)
    BertForSequenceClassification(cfg).eval().save_pretrained(out)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / f, out / f)
    return out


def ceiling(path: Path, device: str, dtype: str, duration: float) -> dict[str, float]:
    """Pairs/s of the bare forward passes, and R1's latency as one pass, in process."""
    import torch

    from serve_app.config.schema import ModelConfig
    from serve_app.engine.embedding import plan_batches
    from serve_app.engine.reranker import RerankEngine

    engine = RerankEngine(ModelConfig(model_id=str(path), task="rerank", device=device,
                                      dtype=dtype), num_threads=os.cpu_count())
    engine.warmup()
    pairs, _ = engine.tokenize(QUERY, docs(256, 0))
    batches = plan_batches([len(p) for p in pairs], engine.max_batch_tokens, 32)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        for b in batches:
            engine.forward([pairs[i] for i in b])
            done += len(b)
    if device == "cuda":
        torch.cuda.synchronize()
    rate = done / (time.perf_counter() - t0)
    lat = []
    for i in range(30):
        t = time.perf_counter()
        engine.rerank(QUERY, docs(20, i))
        lat.append(time.perf_counter() - t)
    return {"R1_ms": statistics.median(lat) * 1000, "pairs_s": rate,
            "tokens_per_pair": sum(map(len, pairs)) / len(pairs)}


async def drive(post: Callable[[list[str]], Awaitable[None]], workload: str,
                duration: float) -> dict[str, float]:
    n, clients = WORKLOADS[workload]
    lat: list[float] = []
    done = 0
    stop = time.perf_counter() + duration

    async def client(c: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            await post(docs(n, (c * 10_000 + i) * n))
            lat.append(time.perf_counter() - t)
            done += n
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return {"p50_ms": statistics.median(lat) * 1000, "pairs_s": done / (time.perf_counter() - t0)}


def measure(url: str, path: str, model: str, duration: float) -> dict[str, dict[str, float]]:
    import aiohttp

    async def run() -> dict[str, dict[str, float]]:
        async with aiohttp.ClientSession(base_url=url) as session:
            async def post(texts: list[str]) -> None:
                body = {"model": model, "query": QUERY, "documents": texts}
                async with session.post(path, json=body) as r:
                    answer = await r.json()
                    if r.status != 200 or len(answer["results"]) != len(texts):
                        raise RuntimeError(f"HTTP {r.status}: {str(answer)[:300]}")

            await drive(post, "R2", 2.0)  # warm up
            return {w: await drive(post, w, duration) for w in WORKLOADS}

    return asyncio.run(run())


@contextlib.contextmanager
def served(path: Path, device: str, dtype: str, tmp: Path):
    http = free_port()
    model = {"name": "reranker", "model_id": str(path), "task": "rerank", "dtype": dtype,
             "device": device, "deployment": {"num_replicas": 1, "num_cpus": "all",
                                              "num_gpus": 1 if device == "cuda" else 0}}
    with start_server(serve_config(http, {"models": [model]}, grpc_port=free_port()), tmp) as s:
        yield str(s)


@contextlib.contextmanager
def infinity(path: Path):
    status = subprocess.run(["bash", str(PEER), "status"], capture_output=True, text=True)
    if not PEER.exists() or "installed in" not in status.stdout:
        yield None
        return
    port = free_port()
    subprocess.run(["bash", str(PEER), "start", str(port)], check=True, capture_output=True,
                   env={**os.environ, "INF_MODEL_DIR": str(path)}, timeout=300)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run(["bash", str(PEER), "stop"], capture_output=True, timeout=120)


def machine(device: str) -> str:
    if device == "cuda":
        import torch

        return f"one {torch.cuda.get_device_name()} (fp16)"
    return f"{os.cpu_count()} cores, load generator on the same cores (fp32)"


def render(ceil: dict[str, float], rows: dict[str, dict[str, dict[str, float]]], where: str,
           command: str, gpu: bool = False) -> str:
    """The run as a section of docs/benchmarks.md (bench/run.py appends it there)."""
    lines = [
        "## Reranking" + (" on a GPU" if gpu else ""), "",
        f"`{command}` on {where}: a cross-encoder the size of ms-marco-MiniLM-L-6-v2 (seeded "
        f"random weights), about {ceil['tokens_per_pair']:.0f} tokens a pair. R1: one query and "
        "20 documents from one client (p50 latency); R2: one query and 50 documents from each "
        "of 4 clients (pairs/s). The ceiling is the engine's forward passes in process (batches "
        "of 32 pairs, every thread), no queue, no server; ratios are to it, measured in the same "
        "run.", "",
        "| server | R1 p50 | R1 added | R2 pairs/s | R2 / ceiling |",
        "|---|---|---|---|---|",
        f"| in process, forward passes only | {ceil['R1_ms']:.1f} ms | | "
        f"{ceil['pairs_s']:.0f} | 1.00x |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['R1']['p50_ms']:.1f} ms | "
                     f"+{r['R1']['p50_ms'] - ceil['R1_ms']:.1f} ms | {r['R2']['pairs_s']:.0f} | "
                     f"{r['R2']['pairs_s'] / ceil['pairs_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-rerank.md"))
    a = p.parse_args()
    command = "python bench/rerank.py" + (f" --device {a.device} --dtype {a.dtype}"
                                          if a.device != "cpu" else "")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_reranker(Path(tmp) / "reranker")
        ceil = ceiling(path, a.device, a.dtype, a.duration)
        print(json.dumps({"ceiling": ceil}), flush=True)
        rows: dict[str, dict[str, dict[str, float]]] = {}
        with served(path, a.device, a.dtype, Path(tmp)) as url:
            rows["serve_app, `/v1/rerank`"] = measure(url, "/v1/rerank", "reranker", a.duration)
        print(json.dumps(rows), flush=True)
        if not a.no_peers and a.device == "cpu":
            with infinity(path) as url:
                if url:
                    rows["infinity-emb 0.0.78, `/v1/rerank`"] = measure(
                        url, "/v1/rerank", "embedding", a.duration)
        print(json.dumps(rows), flush=True)
    where = machine(a.device)
    Path(a.out).write_text(render(ceil, rows, where, command, a.device == "cuda"))
    Path(a.out).with_suffix(".json").write_text(json.dumps(
        {"ceiling": ceil, "rows": rows, "machine": where, "command": command}, indent=1))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
