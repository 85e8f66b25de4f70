"""Bulk embedding client: a file of texts in, vectors out, in input order.

Command line::

    python -m serve_app.tools.client texts.jsonl vectors.npy --url http://127.0.0.1:8000 \\
        --model embedding --protocol openai --batch-size 64 --concurrency 4 \
        --prompt-name document     # an asymmetric model's prompt for the texts indexed

Python::

    from serve_app.tools.client import EmbeddingClient
    client = EmbeddingClient("http://127.0.0.1:8000", model="embedding")
    vectors = client.embed(["first text", "second text"])          # float32 [n, dim]
    client.embed_file("texts.jsonl", "vectors.parquet", field="text")

Texts are read from lines (``.txt``), JSON lines (``.jsonl``, one field) or a Parquet column, sent
in batches over OpenAI (base64), V2 REST (binary tensors) or V2 gRPC with bounded concurrency.
429 and transient errors (503, 504, connection loss) are retried with exponential backoff and
jitter, honouring ``Retry-After``. Each finished batch is kept in ``<output>.partial/``, so a
run started again with ``--resume`` sends only the batches still missing; the output (``.npy``
or Parquet with ``index`` and ``embedding``) is written once every batch is in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.tools.transport import PROTOCOLS, ClientError, Retryable, Transport, transport
from serve_app.types import BULK_PRIORITY

# -- reading texts -----------------------------------------------------------------------------

def read_texts(path: str | Path, field: str = "text") -> list[str]:
    """Texts from ``.txt`` (one per line), ``.jsonl`` (``field`` of each line) or ``.parquet``
    (column ``field``). Empty texts are refused with their line or row number: the server would
    refuse them, and skipping them would shift every later row of the output."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=[field])
        texts = table.column(field).to_pylist()
        where = "row"
    elif suffix in (".jsonl", ".ndjson"):
        texts = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or field not in record:
                    raise ClientError(f"{path}:{n}: no field {field!r}")
                texts.append(record[field])
        where = "record"
    else:
        with path.open(encoding="utf-8") as f:
            texts = [line.rstrip("\r\n") for line in f]
        where = "line"
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise ClientError(f"{path}: {where} {i + 1} is empty or not a string")
    return texts


# -- transports --------------------------------------------------------------------------------

# -- the client --------------------------------------------------------------------------------

@dataclass
class Progress:
    """What a run did: inputs embedded, batches sent and skipped (resumed), retries."""

    inputs: int = 0
    batches: int = 0
    skipped: int = 0
    retries: int = 0
    retried_status: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


class EmbeddingClient:
    """Embeds many texts against a serve_app (or any server speaking the chosen protocol)."""

    def __init__(self, url: str, model: str = "embedding", protocol: str = "openai",
                 batch_size: int = 64, concurrency: int = 4, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 10, backoff_s: float = 0.5,
                 progress: bool = False, prompt_name: str | None = None,
                 priority: int = BULK_PRIORITY) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if batch_size < 1 or concurrency < 1:
            raise ValueError("batch_size and concurrency must be >= 1")
        self.url, self.model, self.protocol = url, model, protocol
        self.batch_size, self.concurrency = batch_size, concurrency
        self.api_key, self.timeout = api_key, timeout
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.progress = progress
        self.prompt_name = prompt_name
        self.priority = priority
        self.last = Progress()

    def _transport(self) -> Transport:
        return transport(self.url, self.model, self.protocol, self.api_key, self.timeout,
                         self.concurrency, self.prompt_name, self.priority)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``texts``, float32 ``[n, dim]``, in order."""
        parts: dict[int, np.ndarray] = {}
        self._run(texts, parts.__setitem__, done=set())
        if not parts:
            return np.zeros((0, 0), np.float32)
        return np.concatenate([parts[i] for i in sorted(parts)])

    def embed_file(self, source: str | Path, output: str | Path, field: str = "text",
                   resume: bool = False) -> Progress:
        """Embed the texts of ``source`` into ``output`` (``.npy`` or ``.parquet``)."""
        texts = read_texts(source, field)
        output = Path(output)
        if output.suffix.lower() not in (".npy", ".parquet"):
            raise ClientError(f"output must end in .npy or .parquet, got {output.name}")
        partial = output.with_name(output.name + ".partial")
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        meta = {"source": str(Path(source).resolve()), "rows": len(texts),
                "batch_size": self.batch_size, "model": self.model}
        if self.prompt_name:  # only then: partial runs from before the option stay resumable
            meta["prompt_name"] = self.prompt_name
        meta_file = partial / "run.json"
        if resume and meta_file.exists() and json.loads(meta_file.read_text()) != meta:
            raise ClientError(f"{partial} belongs to another run (source, rows, batch size, "
                              "model or prompt differ); remove it or run without --resume")
        meta_file.write_text(json.dumps(meta))
        done = {int(p.stem) for p in partial.glob("*.npy")}

        def keep(i: int, vectors: np.ndarray) -> None:
            tmp = partial / f"{i}.tmp.npy"
            np.save(tmp, vectors)
            os.replace(tmp, partial / f"{i}.npy")  # a batch is kept whole or not at all

        self._run(texts, keep, done)
        n_batches = -(-len(texts) // self.batch_size)
        vectors = np.concatenate([np.load(partial / f"{i}.npy") for i in range(n_batches)])
        _write(output, vectors)
        shutil.rmtree(partial)
        return self.last

    def _run(self, texts: Sequence[str], keep: Callable[[int, np.ndarray], None],
             done: set[int]) -> None:
        batches = [(i, texts[s:s + self.batch_size])
                   for i, s in enumerate(range(0, len(texts), self.batch_size))]
        todo = [(i, b) for i, b in batches if i not in done]
        self.last = Progress(skipped=len(batches) - len(todo))
        asyncio.run(self._send_all(todo, keep))

    async def _send_all(self, todo: list[tuple[int, Sequence[str]]],
                        keep: Callable[[int, np.ndarray], None]) -> None:
        transport = self._transport()
        bar = _bar(sum(len(b) for _, b in todo), self.progress)
        queue: asyncio.Queue[tuple[int, Sequence[str]]] = asyncio.Queue()
        for item in todo:
            queue.put_nowait(item)
        t0 = time.perf_counter()

        async def worker() -> None:
            while True:
                try:
                    i, batch = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                vectors = await self._send(transport, batch)
                if len(vectors) != len(batch):
                    raise ClientError(f"batch {i}: {len(batch)} texts but {len(vectors)} vectors")
                keep(i, vectors)
                self.last.inputs += len(batch)
                self.last.batches += 1
                self.last.seconds = time.perf_counter() - t0
                bar.update(len(batch))
                bar.set_postfix(emb_s=f"{self.last.per_second:,.0f}", retries=self.last.retries)

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            self.last.seconds = time.perf_counter() - t0
            bar.close()
            await transport.close()

    async def _send(self, transport: Transport, batch: Sequence[str]) -> np.ndarray:
        for attempt in range(self.max_retries + 1):
            try:
                return await transport.embed(batch)
            except Retryable as e:
                if attempt == self.max_retries:
                    raise ClientError(f"gave up after {attempt + 1} attempts: {e}") from None
                self.last.retries += 1
                key = str(e).split(":")[0]
                self.last.retried_status[key] = self.last.retried_status.get(key, 0) + 1
                wait = self.backoff_s * 2 ** min(attempt, 6) * (0.5 + random.random())
                await asyncio.sleep(max(wait, e.after or 0.0))
        raise AssertionError("unreachable")


def _write(output: Path, vectors: np.ndarray) -> None:
    if output.suffix.lower() == ".npy":
        np.save(output, vectors)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    table = pa.table({"index": pa.array(np.arange(len(vectors)), pa.int64()),
                      "embedding": column})
    pq.write_table(table, output)


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, **kw: Any) -> None: ...

    def close(self) -> None: ...


def _bar(total: int, show: bool) -> Any:
    if not show:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="emb", unit_scale=True, smoothing=0.1)


def read_vectors(path: str | Path) -> np.ndarray:
    """The vectors a run wrote, from ``.npy`` or Parquet, in input order."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path)
    import pyarrow.parquet as pq

    table = pq.read_table(path).sort_by("index")
    return np.array(table.column("embedding").to_pylist(), dtype=np.float32)


# -- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_app.tools.client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help=".txt (a text per line), .jsonl or .parquet")
    p.add_argument("output", help=".npy or .parquet")
    p.add_argument("--url", default="http://127.0.0.1:8000",
                   help="server base URL (gRPC: host:port, e.g. 127.0.0.1:9000)")
    p.add_argument("--model", default="embedding")
    p.add_argument("--protocol", choices=PROTOCOLS, default="openai")
    p.add_argument("--priority", type=int, default=BULK_PRIORITY,
                   help="priority level of every batch (1 the highest; default: a low level, so "
                        "interactive requests go first; 0 sends none)")
    p.add_argument("--prompt-name", default=None,
                   help="the model's prompt for these texts, e.g. document when indexing a corpus "
                        "for an asymmetric model (E5, BGE, nomic); default: the model's default")
    p.add_argument("--field", default="text", help="JSONL field or Parquet column")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-retries", type=int, default=10)
    p.add_argument("--api-key-env", default=None,
                   help="environment variable holding the API key (never a flag: flags leak "
                        "into process lists)")
    p.add_argument("--resume", action="store_true",
                   help="keep the batches a previous run of the same job finished")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        print(f"error: {args.api_key_env} is not set", file=sys.stderr)
        return 2
    client = EmbeddingClient(args.url, args.model, args.protocol, args.batch_size,
                             args.concurrency, api_key, args.timeout, args.max_retries,
                             progress=not args.no_progress, prompt_name=args.prompt_name,
                             priority=args.priority)
    try:
        done = client.embed_file(args.input, args.output, args.field, args.resume)
    except (ClientError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"inputs": done.inputs, "batches": done.batches, "resumed": done.skipped,
                      "retries": done.retries, "seconds": round(done.seconds, 2),
                      "embeddings_per_s": round(done.per_second, 1), "output": args.output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
