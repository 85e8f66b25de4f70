"""Open Inference (V2) rules shared by the REST and gRPC adapters: tensors, parameters, metadata.

BYTES elements on the wire: each a 4-byte little-endian length, then that many bytes.

- An embedding model takes one BYTES tensor of texts, shape ``[n]`` or ``[n, 1]``, and answers
  ``output-0``: FP32 ``[n, dim]``, or with parameter ``encoding_format`` INT8 / UINT8
  ``[n, dim]`` (int8, uint8) or ``[n, ceil(dim / 8)]`` (binary, ubinary).
- A reranker takes ``query`` (BYTES ``[1]``) and ``documents`` (BYTES ``[n]``) and answers
  ``scores``: FP32 ``[n]`` in document order.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.errors import InvalidInput
from serve_app.types import (
    ENCODINGS,
    EmbedRequest,
    Encoding,
    ModelInfo,
    RerankRequest,
    Task,
    deadline,
    priority,
)

PLATFORM = "serve_app_huggingface"
INPUT_NAME = "text"
OUTPUT_NAME = "output-0"
QUERY_INPUT = "query"
DOCUMENTS_INPUT = "documents"
SCORES_OUTPUT = "scores"
OUTPUTS: dict[Task, str] = {"embedding": OUTPUT_NAME, "rerank": SCORES_OUTPUT}
#: the V2 datatype of each numpy dtype an answer holds
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int8): "INT8",
             np.dtype(np.uint8): "UINT8"}
_LEN = struct.Struct("<I")


def split_bytes_tensor(raw: bytes | memoryview) -> list[bytes]:
    """Decode the length-prefixed BYTES serialization into its elements."""
    view = memoryview(raw)
    out: list[bytes] = []
    pos = 0
    while pos < len(view):
        if pos + 4 > len(view):
            raise InvalidInput("BYTES tensor data ends inside an element's 4-byte length prefix")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise InvalidInput(
                f"BYTES element {len(out)} says {n} bytes but only {len(view) - pos} remain"
            )
        out.append(bytes(view[pos : pos + n]))
        pos += n
    return out


def join_bytes_tensor(items: Sequence[bytes]) -> bytes:
    """Encode elements in the length-prefixed BYTES serialization."""
    return b"".join(_LEN.pack(len(b)) + b for b in items)


def fp32_bytes(vectors: np.ndarray) -> bytes:
    """Row-major little-endian float32 bytes (V2 binary extension, gRPC raw output)."""
    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def tensor_bytes(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of an FP32, INT8 or UINT8 answer."""
    if array.dtype == np.float32:
        return fp32_bytes(array)
    return np.ascontiguousarray(array).tobytes()


def datatype_of(array: np.ndarray) -> str:
    return DATATYPES[array.dtype]


def texts_from_elements(
    elements: Sequence[bytes | str], shape: Sequence[int], datatype: str, name: str
) -> tuple[str, ...]:
    """Check one BYTES input tensor and decode its elements as UTF-8 texts."""
    if datatype != "BYTES":
        raise InvalidInput(f"input '{name}' has datatype {datatype}; text inputs must be BYTES")
    shape = list(shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input '{name}' has shape {shape}; expected [n] or [n, 1]")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {shape}")
    if shape[0] != len(elements):
        raise InvalidInput(
            f"input '{name}' has shape {shape} but holds {len(elements)} elements"
        )
    if not elements:
        raise InvalidInput(f"input '{name}' is empty")
    texts = []
    for i, e in enumerate(elements):
        if isinstance(e, bytes):
            try:
                e = e.decode("utf-8")
            except UnicodeDecodeError as err:
                raise InvalidInput(f"input '{name}' element {i} is not valid UTF-8: {err}") from err
        elif not isinstance(e, str):
            raise InvalidInput(
                f"input '{name}' element {i} must be a string, got {type(e).__name__}"
            )
        texts.append(e)  # "" too: KServe's runtime and sentence-transformers embed it
    return tuple(texts)


@dataclass(frozen=True)
class InferOptions:
    """Request parameters serve_app honours on both V2 transports."""

    dimensions: int | None = None
    truncate: bool = True
    timeout_s: float | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    encoding: Encoding = "float"
    raw_scores: bool = False
    priority: int | None = None


def _optional_str(params: Mapping[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is not None and type(value) is not str:
        raise InvalidInput(f"parameter '{key}' must be a string, got {value!r}")
    return value


def infer_options(params: Mapping[str, Any]) -> InferOptions:
    """Read ``dimensions`` (int), ``truncate`` (bool), ``timeout`` (int microseconds, as in
    Triton), ``prompt_name`` / ``input_type`` (str), ``encoding_format`` (str: float, int8,
    uint8, binary, ubinary), ``raw_scores`` (bool, rerankers) and ``priority`` (int, as in
    Triton) from V2 request parameters."""
    dims = params.get("dimensions")
    if dims is not None and (type(dims) is not int):
        raise InvalidInput(f"parameter 'dimensions' must be an integer, got {dims!r}")
    truncate = params.get("truncate", True)
    if type(truncate) is not bool:
        raise InvalidInput(f"parameter 'truncate' must be a boolean, got {truncate!r}")
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise InvalidInput(
            f"parameter 'timeout' must be a positive integer of microseconds, got {timeout!r}"
        )
    encoding = params.get("encoding_format", "float")
    if encoding not in ENCODINGS:
        raise InvalidInput(f"parameter 'encoding_format' must be one of {list(ENCODINGS)}, got "
                           f"{encoding!r}")
    raw_scores = params.get("raw_scores", False)
    if type(raw_scores) is not bool:
        raise InvalidInput(f"parameter 'raw_scores' must be a boolean, got {raw_scores!r}")
    return InferOptions(dimensions=dims, truncate=truncate,
                        timeout_s=None if timeout is None else timeout / 1e6,
                        prompt_name=_optional_str(params, "prompt_name"),
                        input_type=_optional_str(params, "input_type"),
                        encoding=encoding, raw_scores=raw_scores,
                        priority=None if params.get("priority") is None else priority(
                            params["priority"], "parameter 'priority'"))


def check_task_options(opts: InferOptions, task: Task) -> None:
    """Refuse parameters the model's task has no use for, rather than ignore them."""
    if task == "rerank":
        given = [name for name, value in (("dimensions", opts.dimensions),
                                          ("prompt_name", opts.prompt_name),
                                          ("input_type", opts.input_type)) if value is not None]
        if opts.encoding != "float":
            given.append("encoding_format")
    else:
        given = ["raw_scores"] if opts.raw_scores else []
    if given:
        raise InvalidInput(f"parameter(s) {given} do not apply to a model with task {task!r}")


def check_outputs(names: Sequence[str], task: Task = "embedding") -> None:
    out = OUTPUTS[task]
    for n in names:
        if n != out:
            raise InvalidInput(f"unknown output '{n}'; this model has one output, '{out}'")


def internal_request(model: str, task: Task, tensors: Mapping[str, tuple[str, ...]],
                     params: Mapping[str, Any], request_id: str, version: str | None,
                     timeout_s: float | None = None, priority: int = 0
                     ) -> EmbedRequest | RerankRequest:
    """The internal request of one V2 inference for a model doing ``task``: its input tensors'
    texts by name and its request ``parameters``; the ``timeout`` and ``priority`` parameters,
    when given, win over ``timeout_s`` and ``priority`` (the transport's own: headers, metadata)."""
    opts = infer_options(params)
    check_task_options(opts, task)
    common: dict[str, Any] = {
        "model": model, "truncate": opts.truncate, "request_id": request_id, "version": version,
        "deadline": deadline(opts.timeout_s if opts.timeout_s is not None else timeout_s),
        "priority": opts.priority if opts.priority is not None else priority}
    if task == "rerank":
        query, documents = rerank_inputs(tensors)
        return RerankRequest(query=query, documents=documents, raw_scores=opts.raw_scores,
                             **common)
    if len(tensors) != 1:
        raise InvalidInput(f"expected exactly one input tensor of texts, got {len(tensors)}")
    (texts,) = tensors.values()
    return EmbedRequest(inputs=texts, dimensions=opts.dimensions, prompt_name=opts.prompt_name,
                        input_type=opts.input_type, encoding=opts.encoding, **common)


def rerank_inputs(tensors: Mapping[str, tuple[str, ...]]) -> tuple[str, tuple[str, ...]]:
    """The query and documents of a reranker's input tensors, by name."""
    if set(tensors) != {QUERY_INPUT, DOCUMENTS_INPUT}:
        raise InvalidInput(f"a reranker takes two BYTES inputs, '{QUERY_INPUT}' (one text) and "
                           f"'{DOCUMENTS_INPUT}', got {sorted(tensors)}")
    query = tensors[QUERY_INPUT]
    if len(query) != 1:
        raise InvalidInput(f"input '{QUERY_INPUT}' must hold one text, got {len(query)}")
    return query[0], tensors[DOCUMENTS_INPUT]


def model_metadata(name: str, versions: Sequence[str], info: ModelInfo) -> dict[str, Any]:
    """The model metadata answer, as a dict of both transports' field names."""
    if info.task == "rerank":
        inputs = [{"name": QUERY_INPUT, "datatype": "BYTES", "shape": [1]},
                  {"name": DOCUMENTS_INPUT, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": SCORES_OUTPUT, "datatype": "FP32", "shape": [-1]}]
    else:
        inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, info.dim]}]
    return {"name": name, "versions": list(versions), "platform": PLATFORM, "inputs": inputs,
            "outputs": outputs}


def model_parameters(info: ModelInfo) -> dict[str, Any]:
    """What REST metadata adds under ``parameters`` (gRPC's message has no room for it): the
    task, a variant's base, the engine and its measured fidelity, and for an embedding model
    its prompts, encodings and int8/uint8 ranges."""
    out: dict[str, Any] = {"task": info.task, "max_length": info.max_length}
    if info.variant_of is not None:  # loaded on first use; described by its base till then
        out["variant_of"] = info.variant_of
    if info.engine:
        out["engine"] = info.engine
    if info.task == "rerank":
        return out
    out.update(prompts=dict(info.prompts), default_prompt=info.default_prompt,
               encodings=list(ENCODINGS))
    if info.int8_ranges is not None:
        out["int8_ranges"] = {"min": info.int8_ranges[0], "max": info.int8_ranges[1],
                              "calibration_texts": info.calibration_texts}
    return out
