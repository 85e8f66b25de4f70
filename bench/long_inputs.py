"""Beyond one vector per text, measured: long documents (``long_inputs`` truncate vs chunk, and
late chunking) on all-MiniLM-L6-v2, and a multi-vector (ColBERT) model the size of
all-MiniLM-L6-v2, built by PyLate itself (tests/references.py: its encoder and a seeded random
128-wide projection), each in process and served through the default entry point.

    python bench/long_inputs.py                  # writes docs/benchmarks-long-inputs.md (+ .json)

Workloads, each from 2 clients for ``--duration`` seconds after a warm-up:

- long documents of about 1,000 tokens, 4 to a request on the OpenAI route: ``truncate`` embeds
  their first 256 tokens, ``chunk`` all of them in windows of 256 (documents/s, tokens/s);
- late chunking: one such document a request, ``chunk_tokens: 128`` (documents/s, chunks/s);
- multi-vector: documents of about 100 tokens, 16 to a request, on V2 REST with binary
  outputs and on the OpenAI route with base64 matrices (documents/s).

The ceiling of each is the engine's own passes over the same token ids in process, on every
thread: no queue, no server, no encoding; ratios are to it, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serve_app.testing.server import free_port, serve_config, start_server  # noqa: E402

SENTENCE = ("retrieval models read documents of every length: contracts, manuals, papers and "
            "threads whose later pages hold the answer a reader is looking for, so a server "
            "that embeds only their start loses what they say about {topic} in section {i}.")
WORDS = SENTENCE.split(" ")
CLIENTS = 2


def document(seed: int, words: int) -> str:
    """A document of about ``words`` words, different for each ``seed``."""
    out, i = [], 0
    while len(out) < words:
        out += [w.format(topic=f"topic {seed % 17}", i=seed + i) for w in WORDS]
        i += 1
    return " ".join(out[:words])


LONG_WORDS, SHORT_WORDS = 760, 80  # about 1,000 and 100 tokens


async def drive(post: Callable[[int], Awaitable[int]], duration: float) -> dict[str, float]:
    """``CLIENTS`` clients posting for ``duration`` seconds: p50 latency, requests/s and the
    units each answer counted (documents, chunks)."""
    lat: list[float] = []
    done = units = 0
    stop = time.perf_counter() + duration

    async def client(c: int) -> None:
        nonlocal done, units
        i = 0
        while time.perf_counter() < stop:
            t = time.perf_counter()
            n = await post(c * 100_000 + i)  # awaited first: `units += await` loses updates
            units += n
            lat.append(time.perf_counter() - t)
            done += 1
            i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    took = time.perf_counter() - t0
    return {"p50_ms": statistics.median(lat) * 1000, "requests_s": done / took,
            "units_s": units / took}


def ceilings(colbert: Path, duration: float) -> dict[str, float]:
    """Documents/s (and tokens/s) of the engines' own passes, in process, every thread."""
    from serve_app.config.schema import ModelConfig
    from serve_app.engine.batching import plan_batches
    from serve_app.engine.embedding import EmbeddingEngine
    from serve_app.engine.multivector import MultiVectorEngine

    threads = os.cpu_count() or 1
    engine = EmbeddingEngine(ModelConfig(), num_threads=threads)
    engine.warmup()
    docs = [document(i, LONG_WORDS) for i in range(16)]

    def rate(seqs: list[list[int]], per_doc: float, run: Callable[[list[list[int]]], Any]
             ) -> tuple[float, float]:
        batches = plan_batches([len(s) for s in seqs], engine.max_batch_tokens, 32)
        done = tokens = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            for b in batches:
                run([seqs[i] for i in b])
                tokens += sum(len(seqs[i]) for i in b)
            done += 1
        took = time.perf_counter() - t0
        return done * per_doc / took, tokens / took

    cut, _ = engine.prepare(docs)
    windows, _ = engine.prepare_windows(docs)
    out: dict[str, float] = {}
    out["truncate_docs_s"], out["truncate_tokens_s"] = rate(cut, len(docs), engine.forward)
    out["chunk_docs_s"], out["chunk_tokens_s"] = rate(list(windows), len(docs), engine.forward)
    out["doc_tokens"] = float(statistics.mean(
        len(s) for s in engine.tokenize(docs, False, whole=True)[0]))
    late = engine.late_chunks(docs[0], None, None, 128)
    out["late_docs_s"], _ = rate(late.windows, 1, engine.token_pass)
    out["late_chunks"] = float(len(late.spans))
    mv = MultiVectorEngine(ModelConfig(model_id=str(colbert), task="multivector"),
                           num_threads=threads)
    mv.warmup()
    short = [document(i, SHORT_WORDS) for i in range(64)]
    seqs, _ = mv.prepare(short)
    out["multivector_docs_s"], _ = rate(seqs, len(short), mv.forward)
    out["multivector_tokens"] = float(statistics.mean(map(len, seqs)))
    return out


def measure(url: str, duration: float, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    import aiohttp

    async def run() -> dict[str, dict[str, float]]:
        async with aiohttp.ClientSession(base_url=url) as session:
            async def openai(body: dict[str, Any], count: Callable[[Any], int]) -> int:
                async with session.post("/v1/embeddings", json=body) as r:
                    answer = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}: {str(answer)[:300]}")
                    return count(answer)

            def long_docs(mode: str) -> Callable[[int], Awaitable[int]]:
                return lambda seed: openai({"model": "embedding", "long_inputs": mode, "input": [
                    document(seed * 4 + j, LONG_WORDS) for j in range(4)]},
                    lambda a: len(a["data"]))

            async def late(seed: int) -> int:
                return await openai({"model": "embedding", "chunk_tokens": 128,
                                     "input": document(seed, LONG_WORDS)},
                                    lambda a: len(a["data"]))

            async def mv_openai(seed: int) -> int:
                return await openai({"model": "colbert", "encoding_format": "base64", "input": [
                    document(seed * 16 + j, SHORT_WORDS) for j in range(16)]},
                    lambda a: len(a["data"]))

            async def mv_v2(seed: int) -> int:
                texts = [document(seed * 16 + j, SHORT_WORDS) for j in range(16)]
                body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [16],
                                    "data": texts}],
                        "parameters": {"binary_data_output": True}}
                async with session.post("/v2/models/colbert/infer", json=body) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"HTTP {r.status}")
                return 16

            every = {"truncate": long_docs("truncate"), "chunk": long_docs("chunk"),
                     "late": late, "multivector_v2": mv_v2, "multivector_openai": mv_openai}
            runs = {n: every[n] for n in names}
            for post in runs.values():
                await drive(post, 1.5)  # warm up
            return {name: await drive(post, duration) for name, post in runs.items()}

    return asyncio.run(run())


def render(ceil: dict[str, float], served: dict[str, dict[str, float]], command: str) -> str:
    def row(name: str, key: str, units: str, ceiling: float, unit_word: str) -> str:
        r = served[key]
        docs = r["requests_s"] if key == "late" else r["units_s"]  # late: one a request
        return (f"| {name} | {ceiling:.1f} | {docs:.1f} | "
                f"{docs / ceiling:.2f}x | {r['p50_ms']:.0f} ms | {units} {unit_word} |")

    lines = [
        "## Long documents and multi-vector models (issue 25)", "",
        f"`{command}` on {os.cpu_count()} cores, the load generator on the same cores (fp32), "
        f"{time.strftime('%Y-%m-%d')}. Long documents: about {ceil['doc_tokens']:.0f} tokens "
        "each, 4 to a request, from 2 clients, on all-MiniLM-L6-v2 (limit 256); late chunking: "
        f"one document a request cut every 128 tokens ({ceil['late_chunks']:.0f} chunks); "
        "multi-vector: a ColBERT model the size of all-MiniLM-L6-v2 built by PyLate (a 128-wide "
        f"projection), documents of about {ceil['multivector_tokens']:.0f} tokens, 16 to a "
        "request, from 2 clients. Each model is served alone, on every CPU (`num_cpus: all`), "
        "through the default entry point. The ceiling is the engine's own passes over the same "
        "token ids in process, every thread; ratios are to it, in the same run.", "",
        "| workload | ceiling, documents/s | served, documents/s | served / ceiling | "
        "p50 latency | answer |",
        "|---|---|---|---|---|---|",
        row("`long_inputs: truncate` (first 256 tokens)", "truncate", "a vector", ceil[
            "truncate_docs_s"], "per document"),
        row("`long_inputs: chunk` (every token, windows of 256)", "chunk", "a vector",
            ceil["chunk_docs_s"], "per document"),
        row("late chunking, `chunk_tokens: 128`", "late", f"{ceil['late_chunks']:.0f} vectors",
            ceil["late_docs_s"], "per document"),
        row("multi-vector, V2 REST binary", "multivector_v2", "a matrix",
            ceil["multivector_docs_s"], "per document"),
        row("multi-vector, OpenAI base64", "multivector_openai", "a matrix",
            ceil["multivector_docs_s"], "per document"),
        "",
        f"Tokens embedded per second, in process: truncate {ceil['truncate_tokens_s']:.0f}, "
        f"chunk {ceil['chunk_tokens_s']:.0f}: embedding every token of a document costs "
        f"{ceil['truncate_docs_s'] / ceil['chunk_docs_s']:.1f}x the passes of its first 256.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-long-inputs.md"))
    a = p.parse_args()
    from serve_app.engine.model_files import resolve_model_dir
    from tests.references import reference

    minilm = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    colbert = reference("pylate", "pylate_encode.py", {
        "queries": ["q"], "documents": ["d"], "variants": {"bench": {
            "embedding_size": 128, "query_length": 32, "document_length": 180}}},
        {"source": minilm}) / "bench"
    ceil = ceilings(colbert, a.duration)
    print(json.dumps(ceil), flush=True)
    # one model a server, on every CPU, as the ceiling runs
    served: dict[str, dict[str, float]] = {}
    for model, names in (({"name": "embedding"}, ("truncate", "chunk", "late")),
                         ({"name": "colbert", "model_id": str(colbert), "task": "multivector"},
                          ("multivector_v2", "multivector_openai"))):
        model["deployment"] = {"num_cpus": "all"}
        with tempfile.TemporaryDirectory() as tmp, start_server(
                serve_config(free_port(), {"models": [model]}), Path(tmp)) as server:
            served |= measure(str(server), a.duration, names)
    print(json.dumps(served), flush=True)
    command = "python bench/long_inputs.py"
    Path(a.out).write_text(render(ceil, served, command))
    Path(a.out).with_suffix(".json").write_text(json.dumps(
        {"ceiling": ceil, "served": served, "command": command}, indent=1))
    print(Path(a.out).read_text())


if __name__ == "__main__":
    main()
