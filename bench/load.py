"""Load generator for one (protocol, workload) cell: a separate process, bounded in time and
requests, printing one JSON line of results. Sends only to the URL it is given (loopback here).

It shares the machine with the server, so it is kept light: aiohttp and orjson spend about a
fifth of the CPU per request that httpx and json do, CPU the server's forward passes get instead.

    python bench/load.py --protocol openai --workload W2 --url http://127.0.0.1:8000 \
        --grpc 127.0.0.1:9000 --duration 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson

from serve_app.frontend.v2.codec import join_bytes_tensor

MODEL = "embedding"
SHORT = "The quick brown fox jumps over the lazy dog near river {i}."  # about 14 tokens
LONG = ("Large language models map text to dense vectors that capture meaning, so that similar "
        "passages land close together in the embedding space used for retrieval. ") * 3  # ~110

#: name -> (inputs per request, concurrent clients, long texts?)
WORKLOADS = {"W1": (1, 1, False), "W2": (1, 32, False), "W3": (32, 4, False),
             "W4": (32, 2, True)}
PROTOCOLS = ("openai", "openai-base64", "kserve-v1", "v2-json", "v2-binary", "grpc")


def texts_for(workload: str, seed: int) -> list[str]:
    n, _, long = WORKLOADS[workload]
    base = LONG if long else SHORT
    return [f"{base.format(i=seed + j)} {seed + j}" for j in range(n)]


def http_sender(protocol: str, session: aiohttp.ClientSession,
                openai_path: str = "/v1/embeddings") -> Callable[[list[str]], Awaitable[int]]:
    json_headers = {"Content-Type": "application/json"}

    async def post(path: str, body: bytes,
                   headers: dict[str, str]) -> tuple[bytes, Mapping[str, str]]:
        async with session.post(path, data=body, headers=headers) as r:
            content = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {content[:200]!r}")
            return content, r.headers

    async def send(texts: list[str]) -> int:
        if protocol in ("openai", "openai-base64"):
            body = {"model": MODEL, "input": texts,
                    "encoding_format": "base64" if protocol == "openai-base64" else "float"}
            out, _ = await post(openai_path, orjson.dumps(body), json_headers)
            return len(orjson.loads(out)["data"])
        if protocol == "kserve-v1":
            out, _ = await post(f"/v1/models/{MODEL}:predict",
                                orjson.dumps({"instances": texts}), json_headers)
            return len(orjson.loads(out)["predictions"])
        if protocol == "v2-json":
            out, _ = await post(f"/v2/models/{MODEL}/infer", orjson.dumps({"inputs": [
                {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}]}),
                json_headers)
            return int(orjson.loads(out)["outputs"][0]["shape"][0])
        raw = join_bytes_tensor([t.encode() for t in texts])
        header = json.dumps({
            "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                        "parameters": {"binary_data_size": len(raw)}}],
            "parameters": {"binary_data_output": True}}).encode()
        out, headers = await post(
            f"/v2/models/{MODEL}/infer", header + raw,
            {"Inference-Header-Content-Length": str(len(header)),
             "Content-Type": "application/octet-stream"})
        n = int(headers["Inference-Header-Content-Length"])
        return int(json.loads(out[:n])["outputs"][0]["shape"][0])

    return send


def grpc_sender(target: str, application: str | None = None):
    import grpc

    from serve_app.frontend.v2.proto import inference_pb2 as pb
    from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    metadata = (("application", application),) if application else None

    async def send(texts: list[str]) -> int:
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
        req.raw_input_contents.append(join_bytes_tensor([t.encode() for t in texts]))
        resp = await stub.ModelInfer(req, timeout=60, metadata=metadata)
        return int(resp.outputs[0].shape[0])

    return send, channel


async def run(protocol: str, workload: str, url: str, grpc_target: str, duration: float,
              max_requests: int, application: str | None = None,
              openai_path: str = "/v1/embeddings") -> dict[str, float | int | str]:
    _, clients, _ = WORKLOADS[workload]
    latencies: list[float] = []
    state = {"embeddings": 0, "errors": 0, "requests": 0}
    channel = None
    async with aiohttp.ClientSession(
            base_url=url, timeout=aiohttp.ClientTimeout(total=60),
            connector=aiohttp.TCPConnector(limit=clients)) as http:
        if protocol == "grpc":
            send, channel = grpc_sender(grpc_target, application)
        else:
            send = http_sender(protocol, http, openai_path)
        for i in range(2):  # warm the connections and the model's shapes, untimed
            await send(texts_for(workload, 10_000 + i))
        stop_at = time.perf_counter() + duration

        async def client(cid: int) -> None:
            seq = 0
            while time.perf_counter() < stop_at and state["requests"] < max_requests:
                state["requests"] += 1
                texts = texts_for(workload, cid * 100_000 + seq)
                seq += 1
                t0 = time.perf_counter()
                try:
                    n = await send(texts)  # await first: `x += await f()` reads x too early
                    state["embeddings"] += n
                    latencies.append(time.perf_counter() - t0)
                except Exception:
                    state["errors"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        elapsed = time.perf_counter() - t0
    if channel is not None:
        await channel.close()
    latencies.sort()
    return {
        "protocol": protocol, "workload": workload, "elapsed_s": elapsed,
        "requests": len(latencies), "errors": state["errors"],
        "embeddings": state["embeddings"],
        "embeddings_per_s": state["embeddings"] / elapsed if elapsed else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--protocol", choices=PROTOCOLS, required=True)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--grpc", default="127.0.0.1:9000")
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--application", default=None,
                   help="gRPC `application` metadata (needed where several applications run)")
    p.add_argument("--openai-path", default="/v1/embeddings",
                   help="the OpenAI route (KServe's runtime: /openai/v1/embeddings)")
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.protocol, a.workload, a.url, a.grpc, a.duration,
                                     a.max_requests, a.application, a.openai_path))))


if __name__ == "__main__":
    main()
