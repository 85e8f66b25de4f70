"""Same-run A/B of source trees: the default entry point (``python -m serve_app --config``, the
default model on every core, configs/local.yaml's shape) served from each tree in turn, rounds
alternating, W1-W4 on the OpenAI route and gRPC, as ratios to the in-process ceiling of the same
run. For a change that must lose no speed (a refactor), or to settle one design choice.

    python bench/trees.py --tree before=/tmp/base --tree after=. [--rounds 2] [--duration 6]

Each tree is a checkout of serve_app (its ``serve_app/`` package is put first on the server's
PYTHONPATH); this venv's packages serve them all. A tree whose import path or gRPC servicer
differs from this one's (older layouts) is detected from its files. Writes ``--out``
(markdown) and its .json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import ceiling, cell  # noqa: E402
from serve_app.testing.server import free_port, start_server  # noqa: E402

WORKLOADS = ("W1", "W2", "W3", "W4")
PROTOCOLS = ("openai", "grpc")


def paths_of(tree: Path) -> tuple[str, str, str | None]:
    """(import path, gRPC servicer, HAProxy wrapper module) of the serve_app in ``tree``."""
    if (tree / "serve_app" / "serve" / "__init__.py").exists():
        return ("serve_app.serve:build_app", "serve_app.frontend.v2.add_inference_servicer",
                "serve_app.launch.haproxy")
    return ("serve_app.app:build_app", "serve_app.protocols.v2_grpc.add_inference_servicer",
            "serve_app.leftovers")


def wrapper(tree: Path, module: str, tmp: Path) -> str:
    """A ``serve-app-haproxy`` for ``tree``: the installed one imports this checkout's."""
    path = tmp / "haproxy-wrapper"
    path.write_text(f"#!/bin/sh\nPYTHONPATH={tree} exec {sys.executable} -c "
                    f"'import sys; sys.argv[0] = \"serve-app-haproxy\"; "
                    f"from {module} import haproxy_main; haproxy_main()' \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def measure(name: str, tree: Path, duration: float, workloads: tuple[str, ...] = WORKLOADS,
            protocols: tuple[str, ...] = PROTOCOLS) -> list[dict]:
    import_path, servicer, haproxy = paths_of(tree)
    http, grpc_port = free_port(), free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http},
        "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [servicer]},
        "applications": [{"name": "serve_app", "route_prefix": "/", "import_path": import_path,
                          "args": {"models": [{"name": "embedding", "deployment": {
                              "num_replicas": 1, "num_cpus": "all"}}]}}],
    }
    tmp = Path(tempfile.mkdtemp())
    env = {"PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1",
           "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper(tree, haproxy or "", tmp)}
    rows = []
    with start_server(config, tmp, extra_env=env, cwd=tree) as url:
        for workload in workloads:
            for protocol in protocols:
                r = cell(protocol, workload, url, f"127.0.0.1:{grpc_port}", duration)
                r.update(tree=name, workload=workload, protocol=protocol)
                print(json.dumps(r), flush=True)
                rows.append(r)
    return rows


def render(trees: list[str], rows: list[dict], ceil: dict, command: str,
           workloads: tuple[str, ...] = WORKLOADS, protocols: tuple[str, ...] = PROTOCOLS) -> str:
    lines = [
        "# Source trees A/B (bench/trees.py)", "",
        f"`{command}`: the default entry point served from each tree in turn, rounds "
        "alternating; W1 is the added p50 latency over the in-process single call, W2-W4 "
        "served embeddings/s over the in-process ceiling of the same run (median of rounds).", "",
        "| tree | protocol | " + " | ".join("W1 added p50" if w == "W1" else w for w in workloads)
        + " |", "|---|---|" + "---|" * len(workloads),
    ]
    for tree in trees:
        for protocol in protocols:
            cells = []
            for w in workloads:
                got = [r for r in rows if r["tree"] == tree and r["protocol"] == protocol
                       and r["workload"] == w]
                if w == "W1":
                    v = statistics.median(r["p50_ms"] for r in got) - ceil["W1"]["p50_ms"]
                    cells.append(f"+{v:.2f} ms")
                else:
                    v = statistics.median(r["embeddings_per_s"] for r in got)
                    cells.append(f"{v / ceil[w]['embeddings_per_s']:.2f}x")
            lines.append(f"| {tree} | {protocol} | " + " | ".join(cells) + " |")
    lines += ["", f"In-process ceiling of this run: W1 p50 {ceil['W1']['p50_ms']:.2f} ms, "
              + ", ".join(f"{w} {ceil[w]['embeddings_per_s']:.0f}/s" for w in ("W3", "W4"))
              + " (W2 is judged against W3's batch shape).", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per cell")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=PROTOCOLS)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks-trees.md"))
    a = p.parse_args()
    trees = [(n, Path(t).resolve()) for n, t in (x.split("=", 1) for x in a.tree)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ceil = ceiling(min(a.duration, 5.0), "float32", "cpu")
    print(json.dumps(ceil), flush=True)
    rows: list[dict] = []
    for k in range(a.rounds):
        for name, tree in trees if k % 2 == 0 else trees[::-1]:
            rows += [dict(r, round=k) for r in measure(name, tree, a.duration,
                                                       tuple(a.workloads), tuple(a.protocols))]
    command = "python bench/trees.py " + " ".join(sys.argv[1:])
    out = Path(a.out)
    out.write_text(render([n for n, _ in trees], rows, ceil, command, tuple(a.workloads),
                          tuple(a.protocols)))
    out.with_suffix(".json").write_text(json.dumps({"ceiling": ceil, "rows": rows,
                                                    "command": command}, indent=1))
    print(out.read_text())


if __name__ == "__main__":
    main()
