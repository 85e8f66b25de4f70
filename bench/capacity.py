"""The serving path's own capacity: a near-free model (a 1-layer, 32-wide BERT with MiniLM's
tokenizer, built here) served through the default entry point, one short text per request,
counted by C load generators: wrk on every HTTP protocol, h2load on V2 gRPC.

    python bench/capacity.py                       # colocated and separate, every protocol, peers
    python bench/capacity.py --setups default --protocols openai --no-peers --rounds 3
    python bench/capacity.py --tree a=/tmp/base --tree b=. --setups separate   # A/B of trees
    python bench/capacity.py --serve-config configs/k8s-gpu.yaml --no-peers   # a shipped config

For each setup and protocol, after a warm-up: ``c=1`` (one connection: p50 latency; h2load
reports the mean) and ``c=64`` (64 connections: requests per second), for ``--duration``
seconds each. Setups are served as ``make serve`` serves (``python -m serve_app --config``:
configs/local.yaml with the near-free model in place of MiniLM); ``separate`` is the graph of an
ingress and a model deployment (the shape GPU and autoscaled models get). Peers
(../shared/peers: infinity-emb, its ONNX Runtime engine, KServe's HuggingFace runtime) serve the
same model directory on their OpenAI routes, one server at a time, right after ours. With
``--rounds`` > 1 every server is measured again in turn and the best figure of each is kept
(this machine drifts 10-30% within minutes). Writes ``--out`` (markdown) and its .json.

wrk and h2load come from Debian's packages (``apt-get install wrk nghttp2-client``); the
benchmark installs them when they are missing and it may. Where it may not (the GPU machine of
bench/gpu.sh reaches no package index), bench/load.py's aiohttp and grpcio clients stand in:
c=1 is one client's p50, c=64 two processes of 32 clients each, on the protocols they speak
(every one but TEI's); the report says which generator measured each row.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import PEERS, Peer, versions  # noqa: E402
from serve_app.testing.server import free_port, start_server  # noqa: E402

TEXT = "what is the capital of france"
PROTOCOLS = ("openai", "kserve-v1", "v2-json", "tei", "grpc")
SETUPS = {"default": "auto", "separate": "separate"}
CONNECTIONS = (1, 64)


def tools() -> bool:
    """Whether wrk and h2load are here, installed from Debian's packages when missing and this
    process may (root, an index in reach)."""
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("h2load", "nghttp2-client"))
               if shutil.which(tool) is None]
    if missing and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", *missing], capture_output=True)
    return all(shutil.which(tool) for tool in ("wrk", "h2load"))


def near_free_model(root: Path) -> Path:
    """A 1-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer, mean-pooled and normalized
    (sentence-transformers files), made once under ``root``."""
    out = root / "near-free-bert"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import BertConfig, BertModel

    from serve_app.engine.model_files import resolve_model_dir

    minilm = resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")
    tmp = Path(tempfile.mkdtemp(dir=root))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=512)).eval().save_pretrained(tmp)
    for f in minilm.iterdir():  # the tokenizer and the sentence-transformers settings
        if f.is_file() and (f.name.startswith(("tokenizer", "vocab", "special_tokens"))
                            or f.name in ("modules.json", "sentence_bert_config.json")):
            shutil.copy(f, tmp / f.name)
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (tmp / "2_Normalize").mkdir()
    tmp.rename(out)
    return out


def with_onnx(model_dir: Path, root: Path) -> Path:
    """``model_dir`` with its ONNX export at the directory's root (``model.onnx``), as
    infinity's ONNX Runtime engine reads a local directory (peer_infinity_onnx.sh), made
    once under ``root``."""
    out = root / f"{model_dir.name}-onnx"
    if (out / "model.onnx").is_file():
        return out
    from serve_app.engine.convert import export

    graph = Path(tempfile.mkdtemp(dir=root)) / "graph"
    export(model_dir, "AutoModel", graph)
    tmp = Path(tempfile.mkdtemp(dir=root))
    shutil.copytree(model_dir, tmp, dirs_exist_ok=True)
    shutil.copy(graph / "model.onnx", tmp / "model.onnx")
    shutil.rmtree(graph.parent)
    tmp.rename(out)
    return out


# -- the requests ------------------------------------------------------------------------------

def http_request(protocol: str) -> tuple[str, bytes]:
    """(path, JSON body) of one one-text request on ``protocol``."""
    bodies: dict[str, tuple[str, Any]] = {
        "openai": ("/v1/embeddings", {"model": "embedding", "input": TEXT}),
        "kserve-v1": ("/v1/models/embedding:predict", {"instances": [TEXT]}),
        "v2-json": ("/v2/models/embedding/infer", {"inputs": [
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": [TEXT]}]}),
        "tei": ("/embed", {"inputs": TEXT}),
    }
    path, body = bodies[protocol]
    return path, json.dumps(body).encode()


def grpc_frame() -> bytes:
    """One ModelInfer request as a gRPC message frame (uncompressed flag, big-endian length)."""
    from serve_app.frontend.v2.proto import inference_pb2 as pb

    inp = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    inp.contents.bytes_contents.append(TEXT.encode())
    raw = pb.ModelInferRequest(model_name="embedding", inputs=[inp]).SerializeToString()
    return struct.pack(">BI", 0, len(raw)) + raw


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def wrk(url: str, body: bytes, connections: int, duration: float, tmp: Path) -> dict:
    """wrk's requests/s and p50 (ms) for POSTs of ``body`` to ``url``."""
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body.decode())}\n")
    threads = 1 if connections == 1 else 2
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s",
                          "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60).stdout
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    if not (p50 and rps):
        raise RuntimeError(f"wrk said:\n{out}")
    failed = (int(bad.group(1)) if bad else 0) + (sum(map(int, errors.groups())) if errors
                                                  else 0)
    return {"rps": float(rps.group(1)), "p50_ms": _ms(p50.group(1), p50.group(2)),
            "errors": failed}


def h2load(target: str, connections: int, duration: float, tmp: Path) -> dict:
    """h2load's requests/s and mean latency (ms) for ModelInfer calls over h2c to
    ``target``."""
    data = tmp / "infer.grpc"
    data.write_bytes(grpc_frame())
    out = subprocess.run(
        ["h2load", "-c", str(connections), "-m", "1", "-t", "1" if connections == 1 else "2",
         "-D", f"{duration:g}", "-d", str(data), "-H", "content-type: application/grpc",
         "-H", "te: trailers", f"http://{target}/inference.GRPCInferenceService/ModelInfer"],
        capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) "
                     r"failed, (\d+) errored", out)
    if not (rps and mean and done):
        raise RuntimeError(f"h2load said:\n{out}")
    errors = int(done.group(3)) + int(done.group(4))
    if status:
        errors += sum(int(g) for g in status.groups()[1:])
    return {"rps": float(rps.group(1)), "p50_ms": _ms(mean.group(1), mean.group(2)),
            "errors": errors, "latency": "mean"}


#: the protocols bench/load.py speaks, by this benchmark's names
PY_PROTOCOLS = {"openai": "openai", "kserve-v1": "kserve-v1", "v2-json": "v2-json",
                "grpc": "grpc"}


def pyload(protocol: str, base: str, grpc: str, connections: int, duration: float,
           path: str | None = None) -> dict:
    """bench/load.py in place of wrk and h2load: one-text requests from ``connections``
    clients (W1's one, or W2's 32 per process)."""
    workload, procs = ("W1", 1) if connections == 1 else ("W2", max(1, connections // 32))
    cmd = [sys.executable, str(ROOT / "bench" / "load.py"), "--protocol",
           PY_PROTOCOLS[protocol], "--workload", workload, "--url", base, "--grpc", grpc,
           "--duration", f"{duration:g}", "--openai-path", path or "/v1/embeddings"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    got = [json.loads(r.communicate(timeout=duration + 120)[0].strip().splitlines()[-1])
           for r in runs]
    return {"rps": sum(g["requests"] / g["elapsed_s"] for g in got),
            "p50_ms": max(g["p50_ms"] for g in got),
            "errors": sum(g["errors"] for g in got), "generator": "bench/load.py"}


def measure(protocol: str, base: str, grpc: str, duration: float, tmp: Path,
            path: str | None = None, native: bool = True) -> dict[int, dict]:
    """c=1 and c=64 on one protocol, after a short warm-up; ``native``: with wrk and h2load,
    else with :func:`pyload`."""
    out: dict[int, dict] = {}
    if not native:
        pyload(protocol, base, grpc, 8, 3, path)
        return {c: pyload(protocol, base, grpc, c, duration, path) for c in CONNECTIONS}
    if protocol == "grpc":
        h2load(grpc, 8, 3, tmp)
        for c in CONNECTIONS:
            out[c] = h2load(grpc, c, duration, tmp)
        return out
    default_path, body = http_request(protocol)
    url = base + (path or default_path)
    wrk(url, body, 8, 3, tmp)
    for c in CONNECTIONS:
        out[c] = wrk(url, body, c, duration, tmp)
    return out


# -- the servers -------------------------------------------------------------------------------

def local_args(model_dir: Path, topology: str) -> dict:
    """configs/local.yaml's serve_app args, serving ``model_dir`` in ``topology``."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    args = copy.deepcopy(config["applications"][0]["args"])
    args["topology"] = topology
    args["models"][0]["model_id"] = str(model_dir)
    return args


@contextlib.contextmanager
def ours(model_dir: Path, setup: str, tree: Path | None, tmp: Path,
         config_file: str | None = None) -> Iterator[tuple[str, str, Any]]:
    """serve_app (from ``tree``, default this checkout) serving the near-free model in
    ``setup``, or as the shipped ``config_file`` serves its first model (run.py's
    :func:`~bench.run.file_config`): (base URL, gRPC target, server)."""
    from bench.run import file_config
    from bench.trees import paths_of, wrapper

    http, grpc_port = free_port(), free_port()
    import_path, servicer, haproxy = paths_of(tree or ROOT)
    if config_file:
        config = file_config(config_file, http, grpc_port)
        config["applications"][0]["args"]["models"][0]["model_id"] = str(model_dir)
    else:
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": http},
            "grpc_options": {"port": grpc_port, "grpc_servicer_functions": [servicer]},
            "applications": [{"name": "serve_app", "route_prefix": "/",
                              "import_path": import_path,
                              "args": local_args(model_dir, SETUPS[setup])}],
        }
    env: dict[str, str] = {}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
        if haproxy:
            env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper(tree, haproxy, tmp)
    with start_server(config, tmp, extra_env=env, cwd=tree) as s:
        yield f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc_port}", s


@contextlib.contextmanager
def peer(p: Peer, model_dir: Path, onnx_dir: Path) -> Iterator[None]:
    """A peer of ../shared/peers serving ``model_dir`` (its scripts read the model directory
    from the environment; infinity's ONNX engine reads ``onnx_dir``, the same with its
    export)."""
    keep = {k: os.environ.get(k) for k in ("INF_MODEL_DIR", "KSERVE_MODEL_DIR", "INFO_MODEL_DIR")}
    os.environ.update({"INF_MODEL_DIR": str(model_dir), "KSERVE_MODEL_DIR": str(model_dir),
                       "INFO_MODEL_DIR": str(onnx_dir)})
    try:
        p.start()
        yield
    finally:
        p.stop()
        for k, v in keep.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def better(old: dict | None, new: dict) -> dict:
    """The better of two measurements of one cell (this machine drifts)."""
    if old is None:
        return new
    return {1: min(old[1], new[1], key=lambda r: r["p50_ms"]),
            64: max(old[64], new[64], key=lambda r: r["rps"])}


# -- the report --------------------------------------------------------------------------------

def render(rows: dict[tuple[str, str], dict], extra: list[str], command: str, out: Path) -> None:
    infinity = next((v[64]["rps"] for (s, _), v in rows.items() if s.startswith("infinity-emb")
                     and "ONNX" not in s), None)
    colocated = {p: v[64]["rps"] for (s, p), v in rows.items() if s == "default"}
    lines = ["# Capacity: the serving path's own cost", "",
             f"Command: `{command}`. Machine: {versions()}. Model: a 1-layer, 32-wide BERT with "
             "all-MiniLM-L6-v2's tokenizer (bench/capacity.py builds it): its forward pass costs "
             "a fraction of what serving a request costs. One short text per request (~8 "
             "tokens); wrk (HTTP) and h2load (gRPC) on loopback, sharing the 2 cores with the "
             "server; c=1: one connection, p50 (h2load: mean); c=64: 64 connections, requests "
             "per second; errors: non-2xx and socket errors.", "",
             "| server | protocol | c=1 p50 ms | c=64 req/s | vs infinity | vs colocated | "
             "errors |", "|---|---|---|---|---|---|---|"]
    for (setup, protocol), v in rows.items():
        rps = v[64]["rps"]
        vs_inf = f"{rps / infinity:.2f}x" if infinity else ""
        vs_col = f"{rps / colocated[protocol]:.2f}x" if setup == "separate" and protocol in \
            colocated else ""
        unit = " (mean)" if v[1].get("latency") == "mean" else ""
        unit += " (bench/load.py)" if v[1].get("generator") else ""
        lines.append(f"| {setup} | {protocol} | {v[1]['p50_ms']:.2f}{unit} | {rps:.0f} | "
                     f"{vs_inf} | {vs_col} | {v[1]['errors'] + v[64]['errors']} |")
    lines += ["", *[f"- {e}" for e in extra], ""]
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "rows": [{"server": s, "protocol": p, **{f"c{c}": r[c] for c in r}}
                                      for (s, p), r in rows.items()], "extra": extra},
        indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    p.add_argument("--peers", nargs="*", default=None, choices=sorted(PEERS),
                   help="peers to measure (default: every installed one)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="A/B source trees: each setup served from each tree in turn")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks-capacity.md")
    p.add_argument("--serve-config", default=None,
                   help="serve the near-free model as this shipped Serve config serves its "
                        "first model (setup `default`; bench/gpu.sh: configs/k8s-gpu.yaml)")
    p.add_argument("--python-load", action="store_true",
                   help="bench/load.py in place of wrk and h2load, as where they are missing")
    a = p.parse_args()
    native = not a.python_load and tools()
    if not native:
        a.protocols = [q for q in a.protocols if q in PY_PROTOCOLS]
        print("wrk/h2load missing: bench/load.py measures", a.protocols, flush=True)
    if a.serve_config:
        a.setups = ["default"]
    cache = Path(os.environ.get("SERVE_APP_CACHE", Path.home() / ".cache" / "serve_app"))
    cache.mkdir(parents=True, exist_ok=True)
    model_dir = near_free_model(cache)
    peers = [] if a.no_peers else [
        PEERS[n] for n in (a.peers if a.peers is not None else sorted(PEERS))
        if PEERS[n].installed()]
    onnx_dir = with_onnx(model_dir, cache) if peers else model_dir
    trees = [(name, Path(path).resolve()) for name, path in
             (t.split("=", 1) for t in a.tree)]
    rows: dict[tuple[str, str], dict] = {}
    extra: list[str] = []
    for r in range(a.rounds):
        servers = ([(f"{name} {setup}", setup, tree) for name, tree in trees
                    for setup in a.setups] if trees else
                   [(setup, setup, None) for setup in a.setups])
        for name, setup, tree in servers:
            with tempfile.TemporaryDirectory() as tmp_name:
                tmp = Path(tmp_name)
                with ours(model_dir, setup, tree, tmp, a.serve_config) as (base, grpc, server):
                    for protocol in a.protocols:
                        got = measure(protocol, base, grpc, a.duration, tmp, native=native)
                        rows[(name, protocol)] = better(rows.get((name, protocol)), got)
                        print(name, protocol, got, flush=True)
                    if r == 0 and not trees:
                        time.sleep(3)  # idle
                        extra.append(f"{name}: RSS of the whole stack, idle after the load: "
                                     f"{server.rss_bytes() / 2**20:.0f} MB")
        for q in peers:
            with tempfile.TemporaryDirectory() as tmp_name, peer(q, model_dir, onnx_dir):
                got = measure("openai", q.url, "", a.duration, Path(tmp_name), q.openai_path,
                              native)
                rows[(q.name, "openai")] = better(rows.get((q.name, "openai")), got)
                print(q.name, got, flush=True)
                if r == 0:
                    extra.append(f"{q.name}: RSS idle after the load: {q.rss_mb():.0f} MB")
    render(rows, extra, "python bench/capacity.py " + " ".join(sys.argv[1:]), a.out)
    print(a.out.read_text())


if __name__ == "__main__":
    main()
