"""Open Inference Protocol (V2) over gRPC: ``inference.GRPCInferenceService``.

Protobuf in, :class:`EmbedRequest` through the data plane, protobuf out. Domain errors become gRPC
status codes here, once. Text arrives in ``contents.bytes_contents`` or ``raw_input_contents``;
the answer uses the same style (raw float32 bytes, or ``contents.fp32_contents``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import grpc
import numpy as np

from serve_app.env import grpc_default_application
from serve_app.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    ServeAppError,
    Unauthorized,
    lookup,
)
from serve_app.frontend.context import ServerContext
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.kserve import Mode, classify_mode
from serve_app.frontend.pipeline import Call, Internal
from serve_app.frontend.v2.codec import (
    check_outputs,
    datatype_of,
    fp32_bytes,
    internal_outputs,
    internal_request,
    model_metadata,
    output_tensors,
    response_parameters,
    split_bytes_tensor,
    tensor_bytes,
    texts_from_elements,
)
from serve_app.frontend.v2.proto import inference_pb2 as pb
from serve_app.frontend.v2.proto import inference_pb2_grpc as pb_grpc
from serve_app.types import Task

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
PROTOCOL = "v2_grpc"  # the metrics label
GRPC_STATUS: dict[type[ServeAppError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class StatusContext(Protocol):
    def invocation_metadata(self) -> Any: ...

    def set_code(self, code: grpc.StatusCode) -> None: ...

    def set_details(self, details: str) -> None: ...


def grpc_status(err: ServeAppError) -> grpc.StatusCode:
    return lookup(GRPC_STATUS, err, grpc.StatusCode.INTERNAL)


def _metadata(context: Any, name: str) -> str | None:
    """The ``name`` metadata value (``authorization``, ``x-priority``), if the caller sent one."""
    for key, value in getattr(context, "invocation_metadata", lambda: ())() or ():
        if key.lower() == name:
            return str(value)
    return None


def _params(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out


def _contents(array: np.ndarray) -> pb.InferTensorContents:
    """The answer as typed contents. FP32 from numpy without a Python float per value (field 6
    as packed bytes); INT8 and UINT8 in int_contents / uint_contents."""
    if array.dtype == np.int8:
        return pb.InferTensorContents(int_contents=array.reshape(-1).tolist())
    if array.dtype == np.uint8:
        return pb.InferTensorContents(uint_contents=array.reshape(-1).tolist())
    if array.dtype == np.int32:
        return pb.InferTensorContents(int_contents=array.reshape(-1).tolist())
    if array.dtype == np.int64:
        return pb.InferTensorContents(int64_contents=array.reshape(-1).tolist())
    if array.dtype == object:
        return pb.InferTensorContents(bytes_contents=list(array.reshape(-1)))
    raw = fp32_bytes(array)
    n, header = len(raw), bytearray([0x32])  # field 6, wire type 2 (length-delimited)
    while True:
        byte, n = n & 0x7F, n >> 7
        header.append(byte | (0x80 if n else 0))
        if not n:
            break
    return pb.InferTensorContents.FromString(bytes(header) + raw)


def _tensors(req: pb.ModelInferRequest) -> tuple[dict[str, tuple[str, ...]], bool]:
    """Each input tensor's texts by name, and whether they came as raw input contents."""
    raw = len(req.raw_input_contents) > 0
    if raw and len(req.raw_input_contents) != len(req.inputs):
        raise InvalidInput(f"raw_input_contents has {len(req.raw_input_contents)} entries "
                           f"for {len(req.inputs)} inputs")
    tensors: dict[str, tuple[str, ...]] = {}
    for k, inp in enumerate(req.inputs):
        if inp.name in tensors:
            raise InvalidInput(f"input '{inp.name}' is given twice")
        if raw:
            if inp.contents.bytes_contents:
                raise InvalidInput(f"input '{inp.name}' has both contents and raw_input_contents")
            elements: list[bytes] = split_bytes_tensor(req.raw_input_contents[k])
        else:
            elements = list(inp.contents.bytes_contents)
        tensors[inp.name] = texts_from_elements(elements, list(inp.shape), inp.datatype, inp.name)
    return tensors, raw


def to_request(req: pb.ModelInferRequest, task: Task = "embedding", priority: int = 0,
               mode: Mode = "label", offers: tuple[str, ...] = ("pooled",)
               ) -> tuple[Internal, bool, tuple[str, ...]]:
    """The internal request for a model doing ``task`` (``priority``: the ``x-priority``
    metadata's, used when no ``priority`` parameter is given; ``mode``: a classifier's
    answer; ``offers``: the model's outputs), whether the texts came as raw input contents,
    and the outputs to answer."""
    if task in ("embedding", "sparse", "multivector") and len(req.inputs) != 1:
        raise InvalidInput(f"expected exactly one input tensor of texts, got {len(req.inputs)}")
    tensors, raw = _tensors(req)
    names = check_outputs([o.name for o in req.outputs], task, offers)
    internal = internal_request(req.model_name, task, tensors, _params(req.parameters), req.id,
                                req.model_version or None, priority=priority, mode=mode,
                                outputs=internal_outputs(names, task, offers))
    return internal, raw, names


class GrpcInference:
    """The six RPCs over a :class:`DataPlane`. Each takes the request and a context with
    ``set_code``/``set_details`` and never raises. The context parameter is named
    ``grpc_context`` because that is the name Ray Serve passes its gRPC context under."""

    def __init__(self, dataplane: DataPlane, context: ServerContext) -> None:
        self.dataplane = dataplane
        self.context = context

    async def _guard(self, method: str, call: Any, empty: Any, grpc_context: StatusContext,
                     open_method: bool = False) -> Any:
        t0 = time.perf_counter()
        metrics = self.context.metrics
        status = grpc.StatusCode.OK
        try:
            if not open_method:
                self.context.api_keys.check(_metadata(grpc_context, "authorization"))
            return await call()
        except ServeAppError as e:
            status = grpc_status(e)
            metrics.observe_error(PROTOCOL, e.kind, e.variants)
            grpc_context.set_code(status)
            grpc_context.set_details(e.message)
        except Exception:
            log.exception("unexpected error in a gRPC call")
            status = grpc.StatusCode.INTERNAL
            metrics.observe_error(PROTOCOL, "InferenceFailed")
            grpc_context.set_code(status)
            grpc_context.set_details("internal server error")
        finally:
            metrics.observe_request(PROTOCOL, method, "RPC", status.name,
                                    time.perf_counter() - t0)
        return empty

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         grpc_context: StatusContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          grpc_context: StatusContext) -> pb.ServerReadyResponse:
        async def call() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=await self.dataplane.all_ready())

        return await self._guard("ServerReady", call, pb.ServerReadyResponse(), grpc_context,
                                 open_method=True)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         grpc_context: StatusContext) -> pb.ModelReadyResponse:
        async def call() -> pb.ModelReadyResponse:
            model = self.dataplane.model(request.name, request.version or None)
            ready = await self.dataplane.ready(model)
            return pb.ModelReadyResponse(ready=ready)

        return await self._guard("ModelReady", call, pb.ModelReadyResponse(), grpc_context)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             grpc_context: StatusContext) -> pb.ServerMetadataResponse:
        async def call() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=self.dataplane.server_name,
                                             version=self.dataplane.server_version,
                                             extensions=["binary_tensor_data"])

        return await self._guard("ServerMetadata", call, pb.ServerMetadataResponse(),
                                 grpc_context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            grpc_context: StatusContext) -> pb.ModelMetadataResponse:
        async def call() -> pb.ModelMetadataResponse:
            info = await self.dataplane.info(
                self.dataplane.model(request.name, request.version or None))
            versions = self.dataplane.registry.versions(request.name)
            return pb.ModelMetadataResponse(**model_metadata(request.name, versions, info))

        return await self._guard("ModelMetadata", call, pb.ModelMetadataResponse(),
                                 grpc_context)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         grpc_context: StatusContext) -> pb.ModelInferResponse:
        async def call() -> pb.ModelInferResponse:
            call = Call(self.dataplane, self.context.metrics, PROTOCOL, request_id=request.id,
                        priority_text=_metadata(grpc_context, "x-priority"),
                        priority_where="metadata x-priority")
            model = call.find(request.model_name, request.model_version or None)
            full = self.dataplane.overloaded()
            if full is not None:
                raise full
            limit = self.context.max_body_bytes
            if request.ByteSize() > limit:
                raise PayloadTooLarge(f"request message exceeds {limit} bytes (max_body_bytes); "
                                      "send fewer or shorter inputs")
            mode = await classify_mode(self.dataplane, model, _params(request.parameters))
            internal, raw, names = to_request(request, model.task, call.priority(), mode,
                                              await self.dataplane.outputs(model))
            result = await call.run(internal)

            def render() -> pb.ModelInferResponse:
                resp = pb.ModelInferResponse(model_name=request.model_name,
                                             model_version=model.version,
                                             id=request.id or str(uuid.uuid4()))
                for key, value in response_parameters(result).items():
                    resp.parameters[key].int64_param = value
                for name, array in output_tensors(result, names, mode):
                    out = pb.ModelInferResponse.InferOutputTensor(
                        name=name, datatype=datatype_of(array), shape=list(array.shape))
                    if raw:
                        resp.raw_output_contents.append(tensor_bytes(array))
                    else:
                        out.contents.CopyFrom(_contents(array))
                    resp.outputs.append(out)
                return resp

            return call.answer(request.model_name, result, render, internal.effective_priority)

        return await self._guard("ModelInfer", call, pb.ModelInferResponse(), grpc_context)


class _DefaultApplication:
    """A gRPC context whose metadata names ``app`` when the caller named no application."""

    def __init__(self, context: Any, app: str) -> None:
        self._context = context
        self._app = app

    def invocation_metadata(self) -> Any:
        md = tuple(self._context.invocation_metadata() or ())
        if any(k == "application" for k, _ in md):
            return md
        return (*md, ("application", self._app))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def add_inference_servicer(servicer: Any, server: Any) -> None:
    """For ``grpc_options.grpc_servicer_functions``: register the service on Ray Serve's gRPC
    proxy (or on a plain grpc server).

    Ray's proxy routes a call without ``application`` metadata only while a single application
    exists; KServe and Triton clients never send it. On Ray's proxy, calls to this service that
    name no application are therefore sent to serve_app's application
    (:func:`serve_app.env.grpc_default_application`); calls that name one go where they say.
    """
    factory = getattr(server, "service_handler_factory", None)
    if factory is not None:
        app = grpc_default_application()

        def factory_with_default_app(service_method: str, streaming_type: Any) -> Any:
            handler = factory(service_method=service_method, streaming_type=streaming_type)
            unary = getattr(streaming_type, "name", "") == "UNARY_UNARY"
            if not unary or not service_method.startswith(f"/{SERVICE}/"):
                return handler

            async def with_default_app(request: Any, context: Any) -> Any:
                return await handler(request, _DefaultApplication(context, app))

            return with_default_app

        server.service_handler_factory = factory_with_default_app
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
