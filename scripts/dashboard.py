"""serve_app's Grafana dashboard: write its JSON, or render its panels from a real run.

    python scripts/dashboard.py json  [--out k8s/monitoring/grafana-dashboard.json]
    python scripts/dashboard.py render --url http://127.0.0.1:8000 [--duration 60]
                                       [--out docs/dashboard.png]

One list of panels (:data:`PANELS`) makes both. The JSON holds PromQL for Grafana. ``render``
puts load on a running server (every HTTP protocol, mixed batch sizes, a few bad and over-long
inputs, a burst over the queue), scrapes its ``/metrics`` every ``--interval`` seconds, computes
each panel's series from those scrapes the way its PromQL does (rates of counter deltas,
quantiles from histogram bucket deltas), and draws them with matplotlib. It is a rendering of
the dashboard's queries over real scrapes, not a Grafana screenshot.

Every query first takes ``max by (replica, ...)``: each pod's Serve proxy can answer a scrape
from any ingress replica, so one replica's series arrive through several pods.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset], float]


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    series: Callable[[Samples, Samples, float], dict[str, float]]  # (before, after, dt)


def _sum(samples: Samples, name: str, by: str | None = None, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        lab = dict(labels)
        if n != name or any(lab.get(k) != val for k, val in match.items()):
            continue
        key = lab.get(by, "") if by else ""
        out[key] = out.get(key, 0.0) + v
    return out


def _rate(name: str, by: str | None = None, **match: str) -> Callable[..., dict[str, float]]:
    def f(before: Samples, after: Samples, dt: float) -> dict[str, float]:
        a, b = _sum(after, name, by, **match), _sum(before, name, by, **match)
        return {k: max(0.0, v - b.get(k, 0.0)) / dt for k, v in a.items()}

    return f


def _quantile(q: float, name: str, by: str) -> Callable[..., dict[str, float]]:
    """histogram_quantile(q, rate(name_bucket[...])) per ``by`` value, linear in the bucket."""

    def f(before: Samples, after: Samples, dt: float) -> dict[str, float]:
        buckets: dict[str, list[tuple[float, float]]] = {}
        for (n, labels), v in after.items():
            if n != f"{name}_bucket":
                continue
            lab = dict(labels)
            d = v - before.get((n, labels), 0.0)
            le = float("inf") if lab["le"] == "+Inf" else float(lab["le"])
            key = lab.get(by, "")
            merged = dict(buckets.get(key, []))
            merged[le] = merged.get(le, 0.0) + d
            buckets[key] = sorted(merged.items())
        out = {}
        for key, bs in buckets.items():
            total = bs[-1][1]
            if total <= 0:
                continue
            rank, lo, prev = q * total, 0.0, 0.0
            for le, cum in bs:
                if cum >= rank:
                    if le == float("inf"):
                        out[key] = lo
                    else:
                        out[key] = lo + (le - lo) * ((rank - prev) / max(cum - prev, 1e-12))
                    break
                lo, prev = le, cum
        return out

    return f


def _ratio(num: Callable[..., dict[str, float]],
           den: Callable[..., dict[str, float]]) -> Callable[..., dict[str, float]]:
    def f(before: Samples, after: Samples, dt: float) -> dict[str, float]:
        n, d = num(before, after, dt), den(before, after, dt)
        return {k: v / d[k] for k, v in n.items() if d.get(k)}

    return f


def _gauge(name: str, by: str) -> Callable[..., dict[str, float]]:
    return lambda before, after, dt: _sum(after, name, by)


def _by(expr: str, keep: str) -> str:
    """Sum over ingress replicas of one copy per replica (see the module doc)."""
    return f"sum by ({keep}) (max by (replica, {keep}) ({expr}))"


def _rate_panel(title: str, unit: str, name: str, by: str) -> Panel:
    """Per-second rate of the counter ``name`` by ``by``: the PromQL and its in-process twin."""
    legend = "{{" + by + "}}"
    return Panel(title, unit, ((_by(f"rate({name}[1m])", by), legend),), _rate(name, by))


def _quantile_panel(title: str, q: float, name: str, by: str) -> Panel:
    """The ``q`` quantile of the histogram ``name`` by ``by``, in seconds."""
    expr = f"histogram_quantile({q}, " + _by(f"rate({name}_bucket[1m])", f"{by}, le") + ")"
    return Panel(title, "s", ((expr, "{{" + by + "}}"),), _quantile(q, name, by))


PANELS: tuple[Panel, ...] = (
    _rate_panel("Requests / s by protocol", "req/s", "serve_app_requests_total", "protocol"),
    _rate_panel("Errors / s by kind", "req/s", "serve_app_errors_total", "kind"),
    _quantile_panel("Request latency p99 by protocol", 0.99, "serve_app_request_seconds",
                    "protocol"),
    _quantile_panel("Time per request by stage, p50", 0.5, "serve_app_stage_seconds", "stage"),
    _rate_panel("Embeddings / s by model", "inputs/s", "serve_app_embedded_inputs_total",
                "model"),
    _rate_panel("Tokens / s by model", "tokens/s", "serve_app_embedded_tokens_total", "model"),
    Panel("Inputs per forward pass (mean)", "inputs",
          ((_by("rate(serve_app_batch_inputs_sum[1m])", "model") + " / "
            + _by("rate(serve_app_batch_inputs_count[1m])", "model"), "{{model}}"),),
          _ratio(_rate("serve_app_batch_inputs_sum", "model"),
                 _rate("serve_app_batch_inputs_count", "model"))),
    Panel("Queued inputs by model", "inputs",
          ((_by("serve_app_queued_inputs", "model"), "{{model}}"),),
          _gauge("serve_app_queued_inputs", "model")),
    Panel("Truncated inputs / s", "inputs/s",
          ((_by("rate(serve_app_truncated_inputs_total[1m])", "model"), "{{model}}"),),
          _rate("serve_app_truncated_inputs_total", "model")),
)


def dashboard_json() -> dict[str, Any]:
    panels = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1,
            "type": "timeseries",
            "title": p.title,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": (i % 3) * 8, "y": (i // 3) * 8, "w": 8, "h": 8},
            "fieldConfig": {"defaults": {"unit": {"s": "s", "req/s": "reqps"}.get(p.unit,
                                                                                   "short")},
                            "overrides": []},
            "targets": [{"refId": chr(65 + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(p.targets)],
        })
    return {
        "title": "serve_app",
        "uid": "serve-app",
        "tags": ["serve_app", "ray-serve", "embeddings"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource",
                                 "query": "prometheus", "label": "Prometheus"}]},
        "panels": panels,
    }


# -- render from a real run --------------------------------------------------------------------

def parse(text: str) -> Samples:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


async def _load(url: str, stop: asyncio.Event) -> None:
    import httpx

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
             "serve_app", "embeds", "text"]
    rng = random.Random(0)

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 30)))

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        async def client(i: int) -> None:
            while not stop.is_set():
                n = rng.choice([1, 1, 1, 4, 16, 32])
                texts = [text() for _ in range(n)]
                roll = rng.random()
                if roll < 0.03:
                    texts[0] = "long " * 600  # truncated
                if i % 3 == 0:
                    body = {"model": "embedding", "input": texts if roll > 0.02 else []}
                    await c.post("/v1/embeddings", json=body)
                elif i % 3 == 1:
                    await c.post("/v1/models/embedding:predict", json={"instances": texts})
                else:
                    await c.post("/v2/models/embedding/infer", json={"inputs": [{
                        "name": "text", "shape": [n], "datatype": "BYTES", "data": texts}]})
                    if roll < 0.02:
                        await c.post("/v2/models/nope/infer", json={})

        await asyncio.gather(*(client(i) for i in range(12)))


async def _run(url: str, duration: float, interval: float) -> list[tuple[float, Samples]]:
    import httpx

    scrapes: list[tuple[float, Samples]] = []
    stop = asyncio.Event()
    load = asyncio.create_task(_load(url, stop))
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        while time.monotonic() - t0 < duration:
            scrapes.append((time.monotonic() - t0, parse((await c.get("/metrics")).text)))
            await asyncio.sleep(interval)
    stop.set()
    await load
    return scrapes


def render(scrapes: list[tuple[float, Samples]], out: Path, subtitle: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 3, figsize=(18, 11))
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        lines: dict[str, list[tuple[float, float]]] = {}
        for (t0, before), (t, after) in itertools.pairwise(scrapes):
            for key, value in panel.series(before, after, t - t0).items():
                lines.setdefault(key or "all", []).append((t, value))
        for key, pts in sorted(lines.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
        ax.set_title(panel.title)
        ax.set_xlabel("seconds")
        ax.set_ylabel(panel.unit)
        if lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"serve_app dashboard, rendered from a real run ({subtitle})")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("json")
    j.add_argument("--out", default=str(REPO / "k8s" / "monitoring" / "grafana-dashboard.json"))
    r = sub.add_parser("render")
    r.add_argument("--url", default="http://127.0.0.1:8000")
    r.add_argument("--duration", type=float, default=60.0)
    r.add_argument("--interval", type=float, default=2.0)
    r.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"))
    args = p.parse_args()
    if args.cmd == "json":
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dashboard_json(), indent=2) + "\n")
        return 0
    scrapes = asyncio.run(_run(args.url, args.duration, args.interval))
    render(scrapes, Path(args.out), f"{args.duration:.0f} s of mixed load, scraped every "
                                    f"{args.interval:g} s")
    print(f"wrote {args.out} from {len(scrapes)} scrapes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
