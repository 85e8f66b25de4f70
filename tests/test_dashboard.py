"""The Grafana dashboard: the shipped JSON is what scripts/dashboard.py generates, every query
names metrics serve_app exports, and the renderer's series match known traffic."""

from __future__ import annotations

import json
import re
import sys

import pytest

from serve_app.frontend.metrics import Metrics
from tests.helpers import REPO, app_client, replica

sys.path.insert(0, str(REPO / "scripts"))
import dashboard

SHIPPED = REPO / "k8s" / "monitoring" / "grafana-dashboard.json"


def test_shipped_json_is_generated():
    assert json.loads(SHIPPED.read_text()) == dashboard.dashboard_json()


def test_every_query_names_exported_metrics():
    exported = {m.name for m in Metrics().registry.collect()}
    for panel in dashboard.dashboard_json()["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"serve_app_[a-z_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in exported, (panel["title"], name)
            assert "max by (replica" in target["expr"]


def test_panel_series_follow_known_traffic(engine):
    with app_client({"embedding": replica(engine)}) as c:
        before = dashboard.parse(c.get("/metrics").text)
        for _ in range(4):
            c.post("/v1/embeddings", json={"model": "embedding", "input": ["a", "b", "c"]})
        c.post("/v1/embeddings", json={"model": "embedding", "input": []})
        after = dashboard.parse(c.get("/metrics").text)
    panels = {p.title: p for p in dashboard.PANELS}
    assert panels["Embeddings / s by model"].series(before, after, 2.0) == {"embedding": 6.0}
    assert panels["Errors / s by kind"].series(before, after, 2.0) == {"InvalidInput": 0.5}
    mean = panels["Inputs per forward pass (mean)"].series(before, after, 2.0)["embedding"]
    assert 1 <= mean <= 3
    p50 = panels["Time per request by stage, p50"].series(before, after, 2.0)
    assert set(p50) == {"tokenize", "queue", "inference", "encode"}
    assert p50["inference"] > 0


@pytest.mark.parametrize("q,expected", [(0.5, 0.0075), (1.0, 0.01)])
def test_quantile_interpolates_inside_buckets(q, expected):
    le = {"0.005": 0.0, "0.01": 4.0, "+Inf": 4.0}
    after = {("serve_app_stage_seconds_bucket", frozenset({"stage": "x", "le": k}.items())): v
             for k, v in le.items()}
    got = dashboard._quantile(q, "serve_app_stage_seconds", "stage")({}, after, 1.0)
    assert got["x"] == pytest.approx(expected)


def test_benchmark_report_redraws_from_its_json(tmp_path):
    """docs/benchmarks.md, its chart and its JSON belong together: redrawing from the JSON gives
    the same table."""
    import shutil
    import subprocess

    shutil.copy(REPO / "docs" / "benchmarks.json", tmp_path / "b.json")
    subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--render-only", "--out",
                    str(tmp_path / "b.md")], check=True, timeout=120)
    assert (tmp_path / "b.png").stat().st_size > 10_000
    table = [ln for ln in (tmp_path / "b.md").read_text().splitlines() if ln.startswith("| W")]
    report = (REPO / "docs" / "benchmarks.md").read_text().partition("## The scheduler")[0]
    shipped = [ln for ln in report.splitlines() if ln.startswith("| W")]
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    ours = [r for r in rows if r["setup"] != "peer"]  # peer rows: the peers installed
    setups = {r["setup"] for r in ours}  # the default entry, and separate where the run had it
    assert "default" in setups and setups <= {"default", "separate"}
    assert {(r["setup"], r["workload"], r["protocol"]) for r in ours} == {
        (s, w, p) for s in setups for w in ("W1", "W2", "W3", "W4")
        for p in ("openai", "openai-base64", "kserve-v1", "v2-json", "v2-binary", "grpc")}
    assert table == shipped and len(table) == len(rows) and len(ours) == 24 * len(setups)
