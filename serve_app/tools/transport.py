"""The bulk client's transports: one batch of texts in, float32 vectors out, over OpenAI
(base64), V2 REST (binary tensors) or V2 gRPC (raw contents). Errors worth a retry raise
:class:`Retryable`, with the server's ``Retry-After`` when it gave one."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from serve_app.frontend.v2.codec import join_bytes_tensor

PROTOCOLS = ("openai", "v2", "grpc")
RETRY_STATUS = frozenset({429, 502, 503, 504})


class ClientError(Exception):
    """A batch failed for good: a 4xx other than 429, or retries ran out."""


class Retryable(Exception):
    def __init__(self, message: str, after: float | None = None) -> None:
        super().__init__(message)
        self.after = after


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class _Http:
    def __init__(self, url: str, model: str, protocol: str, api_key: str | None,
                 timeout: float, concurrency: int, prompt_name: str | None = None,
                 priority: int = 0) -> None:
        import httpx

        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                         timeout=timeout, limits=limits)
        self._model = model
        self._protocol = protocol
        # what every batch carries besides its texts
        self._extra: dict[str, Any] = {"prompt_name": prompt_name} if prompt_name else {}
        if priority:
            self._extra["priority"] = priority
        self._errors: tuple[type[BaseException], ...] = (httpx.TransportError,)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        try:
            if self._protocol == "openai":
                r = await self._client.post("/v1/embeddings", json={
                    "model": self._model, "input": list(texts), "encoding_format": "base64",
                    **self._extra})
            else:
                raw = join_bytes_tensor([t.encode() for t in texts])
                head = json.dumps({
                    "inputs": [{"name": "text", "shape": [len(texts)], "datatype": "BYTES",
                                "parameters": {"binary_data_size": len(raw)}}],
                    "outputs": [{"name": "output-0", "parameters": {"binary_data": True}}],
                    "parameters": self._extra,
                }).encode()
                r = await self._client.post(
                    f"/v2/models/{self._model}/infer", content=head + raw,
                    headers={"inference-header-content-length": str(len(head)),
                             "content-type": "application/octet-stream"})
        except self._errors as e:
            raise Retryable(f"{type(e).__name__}: {e}") from None
        if r.status_code in RETRY_STATUS:
            raise Retryable(f"HTTP {r.status_code}", _retry_after(r.headers))
        if r.status_code != 200:
            raise ClientError(f"HTTP {r.status_code}: {r.text[:500]}")
        if self._protocol == "openai":
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                             for d in data])
        n = int(r.headers["inference-header-content-length"])
        shape = json.loads(r.content[:n])["outputs"][0]["shape"]
        return np.frombuffer(r.content[n:], "<f4").reshape(shape)

    async def close(self) -> None:
        await self._client.aclose()


class _Grpc:
    def __init__(self, url: str, model: str, api_key: str | None, timeout: float,
                 prompt_name: str | None = None, priority: int = 0) -> None:
        import grpc

        from serve_app.frontend.v2.proto import inference_pb2 as pb
        from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc

        target = url.split("://", 1)[-1].rstrip("/")
        self._pb = pb
        self._grpc = grpc
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)
        self._model = model
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._timeout = timeout
        self._prompt_name = prompt_name
        self._priority = priority

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        pb, grpc = self._pb, self._grpc
        req = pb.ModelInferRequest(model_name=self._model)
        req.inputs.add(name="text", datatype="BYTES", shape=[len(texts)])
        req.raw_input_contents.append(join_bytes_tensor([t.encode() for t in texts]))
        if self._prompt_name:
            req.parameters["prompt_name"].string_param = self._prompt_name
        if self._priority:
            req.parameters["priority"].int64_param = self._priority
        try:
            resp = await self._stub.ModelInfer(req, timeout=self._timeout,
                                               metadata=self._metadata)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Retryable(f"gRPC {code.name}: {e.details()}") from None
            raise ClientError(f"gRPC {code.name}: {e.details()}") from None
        shape = list(resp.outputs[0].shape)
        return np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(shape)

    async def close(self) -> None:
        await self._channel.close()


Transport = _Http | _Grpc


def transport(url: str, model: str, protocol: str, api_key: str | None, timeout: float,
              concurrency: int, prompt_name: str | None = None, priority: int = 0
              ) -> Transport:
    """The transport for ``protocol`` (one of :data:`PROTOCOLS`); ``prompt_name`` and
    ``priority`` (when not 0) go with every batch."""
    if protocol == "grpc":
        return _Grpc(url, model, api_key, timeout, prompt_name, priority)
    return _Http(url, model, protocol, api_key, timeout, concurrency, prompt_name, priority)
