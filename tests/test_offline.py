"""The offline job's Parquet sink keeps rows in input order, within a task and across tasks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data._internal.execution.interfaces.task_context import TaskContext
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

from serve_app.offline import ordered_parquet_sink


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
