"""The bulk client and the Ray Data job end to end, against a server whose queue never refuses
them (tests/conftest.py's separate_server, which serves the default model's weights): a resumed
run sends only what is missing, every protocol gives the same vectors, and the offline job's
rows equal what the server answers. Its runs through a server's 429s: tests/test_robustness.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(separate_server):
    return separate_server


@pytest.fixture(scope="module")
def corpus(bulk_corpus):
    return bulk_corpus


def test_client_resume_sends_only_missing_batches(server, corpus, tmp_path):
    from serve_app.tools.client import EmbeddingClient

    path, _, expected = corpus
    client = EmbeddingClient(server, batch_size=60, concurrency=2)
    out = tmp_path / "v.parquet"
    partial = tmp_path / "v.parquet.partial"
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps(
        {"source": str(path.resolve()), "rows": 3000, "batch_size": 60, "model": "embedding"}))
    for i in (0, 5, 49):  # batches an interrupted run had finished (marked: all zeros)
        np.save(partial / f"{i}.npy", np.zeros((60, 384), np.float32))
    done = client.embed_file(path, out, resume=True)
    assert (done.skipped, done.batches, done.inputs) == (3, 47, 2820)
    from serve_app.tools.client import read_vectors
    vectors = read_vectors(out)
    kept = np.zeros(3000, bool)
    for i in (0, 5, 49):
        kept[i * 60:(i + 1) * 60] = True
    assert not vectors[kept].any()  # resumed batches were not sent again
    np.testing.assert_allclose(vectors[~kept], expected[~kept], atol=1e-5)


@pytest.mark.parametrize("protocol", ["v2", "grpc"])
def test_client_other_protocols_give_the_same_vectors(server, corpus, protocol):
    from serve_app.tools.client import EmbeddingClient

    _, texts, expected = corpus
    url = server if protocol == "v2" else server.grpc
    vectors = EmbeddingClient(url, protocol=protocol, batch_size=50,
                              concurrency=4).embed(texts[:400])
    np.testing.assert_allclose(vectors, expected[:400], atol=1e-5)


def test_ray_data_job_rows_equal_the_served_vectors(server, corpus, tmp_path):
    """The offline job, on a local Ray with two workers, from the same Serve config entry:
    every row keeps its columns and order, and its vector equals what the server answers."""
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from serve_app.tools.client import EmbeddingClient

    _, texts, _ = corpus
    texts = texts[:256]
    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"id": list(range(256)), "body": texts}), source)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "serve_app", "import_path": "serve_app.serve:build_app",
        "args": {"models": [{"name": "embedding", "deployment": {"num_cpus": 1}}]}}]}))
    out = tmp_path / "vectors"
    env = {**os.environ, "RAY_ADDRESS": "local", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "serve_app.tools.offline", "--config", str(config), "--input",
         str(source), "--column", "body", "--output", str(out), "--workers", "2",
         "--num-cpus", "0.5", "--batch-size", "64"],
        capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"ray data: {report}")
    assert report["rows"] == 256 and report["workers"] == 2
    table = pq.read_table(out)
    assert table.column_names == ["id", "body", "embedding"]
    assert table.column("id").to_pylist() == list(range(256))
    assert table.column("body").to_pylist() == texts
    offline = np.array(table.column("embedding").to_pylist(), np.float32)
    served = EmbeddingClient(server, batch_size=50, concurrency=1).embed(texts)
    np.testing.assert_allclose(offline, served, atol=1e-5)
