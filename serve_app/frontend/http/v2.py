"""Open Inference Protocol (V2) over REST, with the binary tensor extension tritonclient uses.

Errors are ``{"error": "<message>"}`` with the status of the domain error.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import InvalidInput, ModelNotReady
from serve_app.frontend.http.bodies import json_response, openapi_body, parse_json, validate
from serve_app.frontend.http.error_bodies import error_route_class, kserve_error
from serve_app.frontend.http.route import call_of, dataplane_of, read_body, respond
from serve_app.frontend.kserve import classify_mode
from serve_app.frontend.v2.codec import (
    check_outputs,
    datatype_of,
    internal_outputs,
    internal_request,
    json_data,
    model_metadata,
    model_parameters,
    output_tensors,
    response_parameters,
    split_bytes_tensor,
    tensor_bytes,
    texts_from_elements,
)
from serve_app.types import Task

_HEADER_LEN = "inference-header-content-length"
_UNSUPPORTED_PARAMS = ("shared_memory_region", "classification")


class InferInput(BaseModel):
    """``{"name": str, "shape": [int], "datatype": str, "parameters"?: {...}, "data"?: [...]}``"""

    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    """``{"name": str, "parameters"?: {"binary_data"?: bool}}``"""

    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    """``{"id"?: str, "parameters"?: {...}, "inputs": [InferInput], "outputs"?: [...]}``"""

    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[InferInput]
    outputs: list[RequestedOutput] | None = None


def _flatten(data: list[Any]) -> list[Any]:
    """JSON tensor data may be nested row by row; V2 means the row-major flattening."""
    if data and all(isinstance(x, list) for x in data):
        return [y for x in data for y in _flatten(x)]
    return data


def _split_body(body: bytes, header_len: str | None) -> tuple[bytes, memoryview]:
    if header_len is None:
        return body, memoryview(b"")
    try:
        n = int(header_len)
    except ValueError:
        raise InvalidInput(
            f"Inference-Header-Content-Length must be an integer, got {header_len!r}"
        ) from None
    if not 0 <= n <= len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes"
        )
    return body[:n], memoryview(body)[n:]


def _input_texts(inp: InferInput, binary: memoryview) -> tuple[tuple[str, ...], int]:
    """The texts of ``inp`` and how many bytes of ``binary`` it used."""
    for p in _UNSUPPORTED_PARAMS:
        if p in inp.parameters:
            raise InvalidInput(f"input parameter '{p}' is not supported")
    size = inp.parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0 or size > len(binary):
            raise InvalidInput(
                f"input '{inp.name}' binary_data_size {size!r} does not fit the "
                f"{len(binary)} binary bytes after the JSON header"
            )
        if inp.data is not None:
            raise InvalidInput(f"input '{inp.name}' has both 'data' and binary_data_size")
        elements: list[Any] = list(split_bytes_tensor(binary[:size]))
        used = size
    else:
        if inp.data is None:
            raise InvalidInput(f"input '{inp.name}' has no 'data' and no binary_data_size")
        elements = _flatten(inp.data)
        used = 0
    return texts_from_elements(elements, inp.shape, inp.datatype, inp.name), used


def _input_tensors(inputs: list[InferInput], binary: memoryview) -> dict[str, tuple[str, ...]]:
    """Each input tensor's texts by name; the binary bytes must be claimed exactly."""
    tensors: dict[str, tuple[str, ...]] = {}
    used = 0
    for inp in inputs:
        if inp.name in tensors:
            raise InvalidInput(f"input '{inp.name}' is given twice")
        tensors[inp.name], n = _input_texts(inp, binary[used:])
        used += n
    if used != len(binary):
        raise InvalidInput(f"{len(binary) - used} binary bytes follow the tensors unclaimed")
    return tensors


def _outputs(req: InferRequest, task: Task, offers: tuple[str, ...]
             ) -> tuple[tuple[str, ...], bool]:
    """The outputs to answer, and whether as binary data (any output asking for it, or the
    request's ``binary_data_output``)."""
    asked = req.outputs or []
    for out in asked:
        for p in _UNSUPPORTED_PARAMS:
            if p in out.parameters:
                raise InvalidInput(f"output parameter '{p}' is not supported")
    names = check_outputs([o.name for o in asked], task, offers)
    if asked:
        return names, any(bool(o.parameters.get("binary_data", False)) for o in asked)
    return names, bool(req.parameters.get("binary_data_output", False))


router = APIRouter(route_class=error_route_class(kserve_error), tags=["v2"])


@router.get("/v2")
async def server_metadata(request: Request) -> Response:
    dp = dataplane_of(request)
    return json_response(
        {"name": dp.server_name, "version": dp.server_version, "extensions": ["binary_tensor_data"]}
    )


@router.get("/v2/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready")
async def ready(request: Request) -> Response:
    ok = await dataplane_of(request).all_ready()
    return json_response({"ready": ok}, status_code=200 if ok else 503)


@router.get("/v2/models/{name}")
@router.get("/v2/models/{name}/versions/{version}")
async def metadata(name: str, request: Request, version: str | None = None) -> Response:
    dp = dataplane_of(request)
    info = await dp.info(dp.model(name, version))
    return json_response({**model_metadata(name, dp.registry.versions(name), info),
                          "parameters": model_parameters(info)})


@router.get("/v2/models/{name}/ready")
@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_ready(name: str, request: Request, version: str | None = None) -> Response:
    dp = dataplane_of(request)
    if not await dp.ready(dp.model(name, version)):
        raise ModelNotReady(f"model {name!r} is not ready")
    return json_response({"name": name, "ready": True})


@router.get("/v2/models/{name}/stats")
@router.get("/v2/models/{name}/versions/{version}/stats")
async def statistics(name: str, request: Request, version: str | None = None) -> Response:
    """A subset of Triton's statistics extension: forward passes by batch size (one replica)."""
    dp = dataplane_of(request)
    model = dp.model(name, version)
    s = await dp.stats(model)
    return json_response({
        "model_stats": [{
            "name": name,
            "version": model.version,
            "inference_count": s.get("texts", 0),
            "execution_count": s.get("passes", 0),
            # serve_app's own: inputs dropped unrun (caller gone, deadline passed), requests
            # refused at the queue bound, inputs held now
            "dropped": s.get("dropped", 0),
            "refused": s.get("refused", 0),
            "queued_inputs": s.get("queued_inputs", 0),
            # texts waiting for a pass, by priority, and the passes running now
            "queued_by_priority": {str(k): v for k, v in s.get("queued_by_priority", {}).items()},
            "running_passes": s.get("running_passes", 0),
            "batch_stats": [
                {"batch_size": b["batch_size"], "compute_infer": {"count": b["count"],
                                                                  "ns": b["ns"]}}
                for b in s.get("batches", [])
            ],
            # a model with variants: whether the replica that answered holds the one named
            # (a variant it does not hold has no passes there), and its variants' loads
            **{k: s[k] for k in ("loaded", "variants") if k in s},
        }]
    })


_INFER_SCHEMA = openapi_body(InferRequest)


@router.post("/v2/models/{name}/infer", openapi_extra=_INFER_SCHEMA)
@router.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=_INFER_SCHEMA)
async def infer(name: str, request: Request, version: str | None = None) -> Response:
    call = call_of(request)
    model = call.find(name, version)
    header, binary = _split_body(await read_body(request), request.headers.get(_HEADER_LEN))
    req = validate(InferRequest, parse_json(header))
    tensors = _input_tensors(req.inputs, binary)
    offers = await call.dataplane.outputs(model)
    names, binary_out = _outputs(req, model.task, offers)
    mode = await classify_mode(call.dataplane, model, req.parameters)
    internal = internal_request(name, model.task, tensors, req.parameters, call.request_id,
                                version, call.timeout_s, call.priority(), mode,
                                internal_outputs(names, model.task, offers))
    result = await call.run(internal)
    return respond(request, call, name, result, lambda: render_infer(
        name, model.version, req.id or call.request_id, output_tensors(result, names, mode),
        response_parameters(result), binary_out), internal.effective_priority)


def render_infer(name: str, version: str, response_id: str,
                 tensors: list[tuple[str, np.ndarray]], parameters: dict[str, int],
                 binary_out: bool) -> Response:
    """The V2 answer: JSON data, or a JSON header followed by each tensor's raw little-endian
    bytes in output order."""
    outputs: list[dict[str, Any]] = [
        {"name": n, "datatype": datatype_of(a), "shape": list(a.shape)} for n, a in tensors]
    body: dict[str, Any] = {
        "model_name": name,
        "model_version": version,
        "id": response_id,
        "parameters": parameters,
        "outputs": outputs,
    }
    if not binary_out:
        for output, (_, array) in zip(outputs, tensors, strict=True):
            output["data"] = json_data(array)
        return json_response(body)
    raws = [tensor_bytes(array) for _, array in tensors]
    for output, raw in zip(outputs, raws, strict=True):
        output["parameters"] = {"binary_data_size": len(raw)}
    raw = b"".join(raws)
    head = orjson.dumps(body)
    return Response(
        head + raw,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
