"""The bulk client's file handling, without a server (the e2e runs are in test_robustness)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serve_app.tools.client import ClientError, EmbeddingClient, _write, read_texts, read_vectors


def test_reads_lines_jsonl_and_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo words\nthree\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two words", "three"]
    (tmp_path / "b.jsonl").write_text('{"text": "x", "id": 1}\n\n{"text": "y"}\n')
    assert read_texts(tmp_path / "b.jsonl") == ["x", "y"]
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    assert read_texts(tmp_path / "c.jsonl", field="body") == ["x"]
    pq.write_table(pa.table({"doc": ["p", "q"], "n": [1, 2]}), tmp_path / "d.parquet")
    assert read_texts(tmp_path / "d.parquet", field="doc") == ["p", "q"]


@pytest.mark.parametrize(("name", "content", "match"), [
    ("e.txt", "ok\n\nafter\n", "line 2 is empty"),
    ("f.jsonl", '{"text": "x"}\n{"other": 1}\n', "f.jsonl:2: no field 'text'"),
    ("g.jsonl", '{"text": 5}\n', "record 1 is empty or not a string"),
])
def test_bad_inputs_name_the_line(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ClientError, match=match):
        read_texts(tmp_path / name)


def test_outputs_round_trip(tmp_path):
    v = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    for name in ("o.npy", "o.parquet"):
        _write(tmp_path / name, v)
        np.testing.assert_array_equal(read_vectors(tmp_path / name), v)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names == ["index", "embedding"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="protocol"):
        EmbeddingClient("http://x", protocol="soap")
    (tmp_path / "t.txt").write_text("a\n")
    with pytest.raises(ClientError, match=r"\.npy or \.parquet"):
        EmbeddingClient("http://x").embed_file(tmp_path / "t.txt", tmp_path / "o.csv")


def test_resume_refuses_another_runs_batches(tmp_path):
    (tmp_path / "t.txt").write_text("a\nb\n")
    partial = tmp_path / "o.npy.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"source": "elsewhere"}))
    with pytest.raises(ClientError, match="belongs to another run"):
        EmbeddingClient("http://x").embed_file(tmp_path / "t.txt", tmp_path / "o.npy",
                                               resume=True)
