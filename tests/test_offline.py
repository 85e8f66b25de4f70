"""The offline job's Parquet sink keeps rows in input order, within a task and across tasks."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data._internal.execution.interfaces.task_context import TaskContext
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

from serve_app.tools.offline import ordered_parquet_sink
from serve_app.types import BULK_PRIORITY


def test_sink_keeps_block_and_task_order(tmp_path):
    """Many small blocks per write task, and tasks finishing out of order. Ray's own
    ``ParquetDatasink`` (pyarrow's threaded ``write_dataset``) fails this test."""
    rows, per_block, per_task = 0, 64, 150
    sink = ordered_parquet_sink(str(tmp_path / "out"))
    sink.on_write_start()
    for task in (1, 0, 2):  # the order tasks finish in does not matter; their index does
        first = task * per_task * per_block
        blocks = [pa.table({"id": list(range(first + b * per_block, first + (b + 1) * per_block)),
                            "embedding": [[float(b)]] * per_block}) for b in range(per_task)]
        ctx = TaskContext(task_idx=task, op_name="Write", kwargs={WRITE_UUID_KWARG_NAME: "w"})
        sink.write(blocks, ctx)
        rows += per_task * per_block
    table = pq.read_table(tmp_path / "out")
    assert table.column("id").to_pylist() == list(range(rows))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"w_00000{i}.parquet" for i in range(3)]


def test_embed_batch_applies_the_prompt_name(prompted_minilm):
    """The job's worker embeds with the prompt it is given, as sentence-transformers does, and
    refuses a name the model lacks before any batch."""
    import numpy as np
    import pytest
    from sentence_transformers import SentenceTransformer

    from serve_app.config.schema import ModelConfig
    from serve_app.errors import InvalidInput
    from serve_app.tools.offline import EmbedBatch

    cfg = ModelConfig(model_id=str(prompted_minilm))
    texts = ["a corpus passage about cats", "another passage"]
    out = EmbedBatch(cfg, "body", 1, prompt_name="document")(pa.table({"body": texts}))
    want = SentenceTransformer(str(prompted_minilm), device="cpu").encode(
        texts, prompt_name="document")
    np.testing.assert_allclose(np.array(out.column("embedding").to_pylist()), want, atol=1e-5)
    with pytest.raises(InvalidInput, match="no prompt 'doc'"):
        EmbedBatch(cfg, "body", 1, prompt_name="doc")


def test_job_command_line_passes_the_prompt_name(tmp_path, monkeypatch):
    import ray
    import yaml

    from serve_app.tools import offline

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "serve_app", "import_path": "serve_app.serve:build_app", "args": {}}]}))
    seen = {}
    monkeypatch.setattr(ray, "init", lambda **kw: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(offline, "embed_dataset",
                        lambda *a: seen.update(args=a) or {"rows": 0})
    assert offline.main(["--config", str(config), "--input", "x.txt", "--output", "out",
                         "--prompt-name", "document"]) == 0
    assert seen["args"][-2:] == ("document", BULK_PRIORITY)  # bulk work's level by default
    assert offline.main(["--config", str(config), "--input", "x.txt", "--output", "out",
                         "--priority", "0"]) == 0
    assert seen["args"][-1] == 0
    assert offline.main(["--config", str(config), "--input", "x.txt", "--output", "out",
                         "--priority", "-3"]) == 2


def test_job_workers_run_at_the_niceness_of_their_level(minilm_dir):
    """A worker at the bulk level runs niced (in a process of its own: niceness only rises);
    the highest level and none leave it as it is."""
    from serve_app.tools.offline import niceness

    assert [niceness(x) for x in (0, 1, 2, 10, 1000)] == [0, 0, 1, 9, 19]
    code = ("import os; from serve_app.config.schema import ModelConfig; "
            "from serve_app.tools.offline import EmbedBatch; "
            f"EmbedBatch(ModelConfig(model_id={str(minilm_dir)!r}), 'text', 1, priority={{}}); "
            "print(os.nice(0))")
    # both workers at once (each loads the model: a process of its own per level)
    runs = {want: subprocess.Popen([sys.executable, "-c", code.format(level)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for level, want in ((10, 9), (0, 0))}
    try:
        for want, proc in runs.items():
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            assert int(out.split()[-1]) == os.nice(0) + want
    finally:
        for proc in runs.values():
            proc.kill()
            proc.wait()


def test_job_refuses_a_reranker():
    import pytest

    from serve_app.config.schema import ModelConfig
    from serve_app.tools.offline import embed_dataset

    with pytest.raises(ValueError, match="rerank model"):
        embed_dataset("in", "out", ModelConfig(name="ce", task="rerank"))
