"""Embed a corpus offline on the Ray cluster with Ray Data: the serving engine, the serving config.

::

    python -m serve_app.tools.offline --config configs/local.yaml --model embedding \\
        --input corpus.parquet --column text --output vectors/ --workers 4

Reads Parquet, JSON lines or text files (a file, a directory or a glob; anything Ray Data reads,
local or ``s3://``), embeds the ``--column`` with
:class:`serve_app.engine.embedding.EmbeddingEngine` built from the same model entry the Serve config
serves (model, revision, pooling, max_length, dtype, batching), on ``--workers`` CPU or GPU workers,
and writes Parquet: every input column plus ``embedding`` (fixed-size list of float32), rows in
input order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve_app.config.schema import ModelConfig
from serve_app.config.serve_yaml import model_from_serve_config
from serve_app.env import ray_address
from serve_app.errors import InvalidInput
from serve_app.types import BULK_PRIORITY
from serve_app.types import priority as check_priority


def niceness(priority: int) -> int:
    """The CPU niceness the job's workers take at ``priority`` (1 the highest, 0 the
    default): ``priority - 1``, at most 19. The job runs its own engine, so it never waits in a
    server's queue; on nodes it shares with the server's replicas, the kernel then runs the
    replicas' threads first (the bulk client's requests wait below queries in the queue
    instead)."""
    return min(19, max(0, priority - 1))



class EmbedBatch:
    """A Ray Data worker: loads the engine once, then embeds one Arrow batch at a time, at the
    CPU niceness of its ``priority`` level."""

    def __init__(self, cfg: ModelConfig, column: str, threads: int | None = None,
                 prompt_name: str | None = None, priority: int = 0) -> None:
        from serve_app.engine.embedding import EmbeddingEngine

        if niceness(priority):
            os.nice(niceness(priority))  # this worker process's own, for the job's lifetime

        self.engine = EmbeddingEngine(cfg, num_threads=threads)
        self.engine.verify()  # the same fidelity floor as a served replica's
        self.column = column
        self.prompt_name = prompt_name
        self.engine.prompt(prompt_name)  # an unknown name fails here, before any batch

    def __call__(self, batch: Any) -> Any:
        import numpy as np
        import pyarrow as pa

        texts = batch.column(self.column).to_pylist()
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t), None)
        if bad is not None:
            raise ValueError(f"column {self.column!r} holds an empty or non-text value "
                             f"({texts[bad]!r})")
        vectors, _ = self.engine.embed(texts, prompt_name=self.prompt_name)
        flat = pa.array(np.ascontiguousarray(vectors).reshape(-1), type=pa.float32())
        return batch.append_column(
            "embedding", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))


def ordered_parquet_sink(output: str) -> Any:
    """A Parquet sink that keeps row order: one file per write task, named by the task's index
    (``preserve_order`` numbers tasks in input order), its blocks written one after another.

    ``Dataset.write_parquet`` hands each task's blocks to ``pyarrow.dataset.write_dataset`` with
    ``use_threads=True``, which may write them in any order within a file.
    """
    import pyarrow.parquet as pq
    from ray.data.datasource import BlockBasedFileDatasink

    class OrderedParquetSink(BlockBasedFileDatasink):
        def write_block_to_file(self, block: Any, file: Any) -> None:
            pq.write_table(block.to_arrow(), file)

    return OrderedParquetSink(output, file_format="parquet")


def read_dataset(source: str, column: str) -> Any:
    import ray.data

    lower = source.lower()
    if lower.endswith(".parquet") or Path(source).is_dir():
        return ray.data.read_parquet(source)
    if lower.endswith((".jsonl", ".ndjson", ".json")):
        return ray.data.read_json(source, lines=True) if not lower.endswith(".json") \
            else ray.data.read_json(source)
    ds = ray.data.read_text(source)  # one row per line, column "text"
    return ds if column == "text" else ds.rename_columns({"text": column})


def embed_dataset(source: str, output: str, cfg: ModelConfig, column: str = "text",
                  workers: int | None = None, batch_size: int = 256,
                  num_cpus: float | None = None, num_gpus: float | None = None,
                  prompt_name: str | None = None, priority: int = BULK_PRIORITY
                  ) -> dict[str, Any]:
    """Run the job on the connected Ray cluster; returns what it did. ``prompt_name``: the
    model's prompt for these texts (``document`` when indexing a corpus for an asymmetric
    model), else its default prompt. ``priority``: the level its workers run at
    (:func:`niceness`)."""
    import ray
    import ray.data

    if cfg.task != "embedding":
        raise ValueError(f"model {cfg.name!r} is a {cfg.task} model; the job embeds texts")

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    cpus = cfg.deployment.num_cpus if num_cpus is None else num_cpus
    gpus = cfg.deployment.num_gpus if num_gpus is None else num_gpus
    if workers is None:  # one CPU stays free for the read and write tasks
        per = max(cpus, 0.1)
        workers = max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // per))
        if gpus:
            workers = max(1, min(workers, int(ray.cluster_resources().get("GPU", 0) // gpus)))
    threads = max(1, int(cpus)) if cpus else None
    t0 = time.perf_counter()
    ds = read_dataset(source, column).map_batches(
        EmbedBatch, fn_constructor_args=(cfg, column, threads, prompt_name, priority),
        batch_size=batch_size,
        batch_format="pyarrow", concurrency=workers, num_cpus=cpus, num_gpus=gpus,
    )
    ds.write_datasink(ordered_parquet_sink(output))
    seconds = time.perf_counter() - t0
    rows = ray.data.read_parquet(output).count()
    return {"rows": rows, "workers": workers, "seconds": round(seconds, 2),
            "embeddings_per_s": round(rows / seconds, 1) if seconds else 0.0, "output": output}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve_app.tools.offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the Serve config the model is served with")
    p.add_argument("--model", default=None, help="model name (default: the config's first)")
    p.add_argument("--version", default=None, help="model version (default: the default one)")
    p.add_argument("--app", default=None, help="Serve application name, if several")
    p.add_argument("--input", required=True, help="Parquet, JSON lines or text: file, dir, glob")
    p.add_argument("--column", default="text", help="the column (JSON field) holding the texts")
    p.add_argument("--output", required=True, help="output directory of Parquet files")
    p.add_argument("--workers", type=int, default=None,
                   help="embedding workers (default: as many as the cluster's CPUs, less one "
                        "for reading and writing, or its GPUs allow)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per engine call")
    p.add_argument("--num-cpus", type=float, default=None, help="default: the model's num_cpus")
    p.add_argument("--num-gpus", type=float, default=None, help="default: the model's num_gpus")
    p.add_argument("--prompt-name", default=None,
                   help="the model's prompt for these texts (config_sentence_transformers.json), "
                        "e.g. document when indexing a corpus; default: the model's default")
    p.add_argument("--priority", type=int, default=BULK_PRIORITY,
                   help="priority level of the job (1 the highest, 0 none): its workers run at "
                        f"CPU niceness priority - 1, so on nodes shared with a server's replicas "
                        f"the replicas come first (default: {BULK_PRIORITY})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import ray

    args = _parser().parse_args(argv)
    try:
        cfg = model_from_serve_config(args.config, args.model, args.version, args.app)
        checked = check_priority(args.priority, "--priority")
    except (OSError, ValueError, InvalidInput) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(address=ray_address())
    try:
        report = embed_dataset(args.input, args.output, cfg, args.column, args.workers,
                               args.batch_size, args.num_cpus, args.num_gpus,
                               args.prompt_name, checked)
    finally:
        ray.shutdown()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
