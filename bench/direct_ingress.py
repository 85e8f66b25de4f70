"""Experiment: Ray Serve's throughput-optimized mode with clients on the ingress replica's own port.

    python bench/direct_ingress.py [--duration 6]

``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` turns on direct ingress: each ingress replica serves HTTP on
its own port (from 30000), skipping the proxy actor. This runs one ``serve run`` in that mode and
measures W1 and W2 over OpenAI through the proxy port and through the replica's port, in the
same run. Not shipped as a default: clients would need the replica ports (Ray fronts them with
HAProxy, which this environment does not have).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, serve_config, serve_run  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--replica-port", type=int, default=30000)
    a = p.parse_args()
    port, grpc_port = free_port(), free_port()
    config = serve_config(port, {"models": [{"name": "embedding", "torch_threads": 2,
                                             "deployment": {"num_cpus": 1}}]},
                          grpc_port=grpc_port)
    env = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    with serve_run(config, Path(tempfile.mkdtemp()), extra_env=env) as proxy:
        for name, url in (("proxy", proxy), ("direct", f"http://127.0.0.1:{a.replica_port}")):
            for workload in ("W1", "W2"):
                out = subprocess.run(
                    [sys.executable, str(ROOT / "bench" / "load.py"), "--protocol", "openai",
                     "--workload", workload, "--url", url, "--grpc", f"127.0.0.1:{grpc_port}",
                     "--duration", str(a.duration)],
                    capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(json.dumps({"path": name, "workload": workload,
                                  "p50_ms": round(r["p50_ms"], 1),
                                  "embeddings_per_s": round(r["embeddings_per_s"], 1),
                                  "errors": r["errors"]}), flush=True)


if __name__ == "__main__":
    main()
