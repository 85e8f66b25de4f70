"""Open Inference (V2) rules shared by the REST and gRPC adapters: tensors, parameters, metadata.

BYTES elements on the wire: each a 4-byte little-endian length, then that many bytes.

- An embedding model takes one BYTES tensor of texts, shape ``[n]`` or ``[n, 1]``, and answers
  ``output-0``: FP32 ``[n, dim]``, or with parameter ``encoding_format`` INT8 / UINT8
  ``[n, dim]`` (int8, uint8) or ``[n, ceil(dim / 8)]`` (binary, ubinary). Parameter
  ``long_inputs`` (truncate, chunk, error) says what becomes of a text over the model's limit.
  Late chunking (parameter ``chunks``: ``[[start, end], ...]`` character offsets, as JSON text
  over gRPC; or ``chunk_tokens``: N) takes one text and answers a vector per chunk in
  ``output-0`` and their offsets in ``chunk_offsets``: INT64 ``[chunks, 2]``.
- A reranker takes ``query`` (BYTES ``[1]``) and ``documents`` (BYTES ``[n]``) and answers
  ``scores``: FP32 ``[n]`` in document order.
- A classifier takes one BYTES tensor of texts (any name, as KServe's runtime), or ``text`` and
  ``text_pair`` (pairs), and answers ``output-0`` as KServe's runtime does
  (:mod:`serve_app.frontend.kserve`: INT64 label indices, or with ``return_probabilities`` /
  ``return_raw_logits`` BYTES), and, when asked for by name, ``scores``: FP32 ``[n, labels]``
  (probabilities; logits with ``raw_scores``).
- A multi-vector model takes one BYTES tensor of texts and answers ``multivector``: FP32
  ``[rows, dim]``, every text's rows stacked, and ``multivector_offsets``: INT64 ``[n + 1]``. An
  embedding model with BGE-M3's heads answers those and the sparse outputs below too, any of
  them from one pass.
- A sparse model takes one BYTES tensor of texts and answers its vectors as compressed sparse
  rows: ``indices`` INT32 ``[nnz]`` (vocabulary ids), ``values`` FP32 ``[nnz]`` and
  ``offsets`` INT64 ``[n + 1]`` (row ``i`` is ``offsets[i]:offsets[i + 1]``); parameter
  ``max_active_dims`` keeps each row's largest values.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serve_app.errors import InvalidInput
from serve_app.frontend.kserve import MODE_PARAMETERS, Mode, by_label_text, labels_of
from serve_app.types import (
    ENCODINGS,
    ChunkEmbedResult,
    ClassifyInput,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    Encoding,
    LongInputs,
    Measured,
    ModelInfo,
    MultiEmbedResult,
    Output,
    RerankRequest,
    RerankResult,
    SparseEmbedResult,
    Task,
    TokenEmbedResult,
    deadline,
    late_chunking,
    long_inputs,
    priority,
)

PLATFORM = "serve_app_huggingface"
INPUT_NAME = "text"
OUTPUT_NAME = "output-0"
QUERY_INPUT = "query"
DOCUMENTS_INPUT = "documents"
SCORES_OUTPUT = "scores"
PAIR_INPUT = "text_pair"
SPARSE_OUTPUTS = ("indices", "values", "offsets")
#: late chunking's output: each chunk's [start, end) character offsets, INT64 [chunks, 2]
CHUNK_OFFSETS = "chunk_offsets"
#: a multi-vector answer: every text's rows, FP32 [rows, dim] stacked, and where each text's
#: start (INT64 [n + 1])
MULTIVECTOR_OUTPUTS = ("multivector", "multivector_offsets")
#: the outputs a model of each task has, and (``DEFAULT_OUTPUTS``) those it answers when none
#: is asked for
OUTPUTS: dict[Task, tuple[str, ...]] = {
    "embedding": (OUTPUT_NAME, CHUNK_OFFSETS), "rerank": (SCORES_OUTPUT,), "sparse": SPARSE_OUTPUTS,
    "multivector": MULTIVECTOR_OUTPUTS,
    "classify": (OUTPUT_NAME, SCORES_OUTPUT)}
DEFAULT_OUTPUTS: dict[Task, tuple[str, ...]] = {**OUTPUTS, "classify": (OUTPUT_NAME,),
                                                "embedding": (OUTPUT_NAME,)}
#: the V2 datatype of each numpy dtype an answer holds
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int8): "INT8",
             np.dtype(np.uint8): "UINT8", np.dtype(np.int32): "INT32",
             np.dtype(np.int64): "INT64", np.dtype(object): "BYTES"}
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
    """Row-major little-endian bytes of an answer (BYTES: length-prefixed elements)."""
    if array.dtype == np.float32:
        return fp32_bytes(array)
    if array.dtype == object:
        return join_bytes_tensor(list(array.reshape(-1)))
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def json_data(array: np.ndarray) -> Any:
    """A tensor's JSON ``data``: flat, BYTES elements as text."""
    if array.dtype == object:
        return [e.decode() for e in array.reshape(-1)]
    return array.reshape(-1)


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
    long_inputs: LongInputs | None = None
    chunks: tuple[tuple[int, int], ...] | None = None
    chunk_tokens: int | None = None
    timeout_s: float | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    encoding: Encoding = "float"
    raw_scores: bool = False
    priority: int | None = None
    max_active_dims: int | None = None
    #: what the request's parameters are, for what only some tasks read
    params: Mapping[str, Any] | None = None


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
    active = params.get("max_active_dims")
    if active is not None and type(active) is not int:
        raise InvalidInput(f"parameter 'max_active_dims' must be an integer, got {active!r}")
    chunks = params.get("chunks")
    if isinstance(chunks, str):  # gRPC parameters are scalars: the offsets as JSON text
        try:
            chunks = orjson.loads(chunks)
        except orjson.JSONDecodeError:
            raise InvalidInput("parameter 'chunks' must be a list of [start, end] character "
                               "offsets, or that list as JSON text", param="chunks") from None
    chunk_spans, chunk_tokens = late_chunking(chunks, params.get("chunk_tokens"))
    return InferOptions(dimensions=dims, truncate=truncate,
                        long_inputs=long_inputs(params.get("long_inputs"),
                                                params.get("truncate")),
                        chunks=chunk_spans, chunk_tokens=chunk_tokens,
                        timeout_s=None if timeout is None else timeout / 1e6,
                        prompt_name=_optional_str(params, "prompt_name"),
                        input_type=_optional_str(params, "input_type"),
                        encoding=encoding, raw_scores=raw_scores, max_active_dims=active,
                        params=params,
                        priority=None if params.get("priority") is None else priority(
                            params["priority"], "parameter 'priority'"))


def check_task_options(opts: InferOptions, task: Task) -> None:
    """Refuse parameters the model's task has no use for, rather than ignore them."""
    given = []
    if task in ("rerank", "classify"):
        given = [name for name, value in (("dimensions", opts.dimensions),
                                          ("prompt_name", opts.prompt_name),
                                          ("input_type", opts.input_type)) if value is not None]
        if opts.encoding != "float":
            given.append("encoding_format")
    elif opts.raw_scores:
        given.append("raw_scores")
    if task in ("rerank", "classify", "multivector") and opts.max_active_dims is not None:
        given.append("max_active_dims")
    if task in ("rerank", "classify") and opts.params and "long_inputs" in opts.params:
        given.append("long_inputs")
    if task != "embedding":
        given += [k for k in ("chunks", "chunk_tokens") if opts.params and k in opts.params]
    if task != "classify":
        given += [k for k in MODE_PARAMETERS if opts.params and k in opts.params]
    if given:
        raise InvalidInput(f"parameter(s) {given} do not apply to a model with task {task!r}")


def _offered(task: Task, offers: Sequence[str]) -> dict[str, Output]:
    """Each V2 output a model doing ``task`` answers, and the internal output it comes from
    (a dense model with BGE-M3's heads answers their sparse and multi-vector outputs too)."""
    names = dict.fromkeys(OUTPUTS[task], "pooled")
    if task == "embedding":
        for output, more in (("sparse", SPARSE_OUTPUTS), ("multivector", MULTIVECTOR_OUTPUTS)):
            if output in offers:
                names.update(dict.fromkeys(more, output))
    return names  # type: ignore[return-value]


def check_outputs(names: Sequence[str], task: Task = "embedding",
                  offers: Sequence[str] = ("pooled",)) -> tuple[str, ...]:
    """The outputs to answer: those ``names`` asks for, else the task's default ones."""
    have = _offered(task, offers)
    for n in names:
        if n not in have:
            raise InvalidInput(f"unknown output '{n}'; this model's outputs: {list(have)}")
    return tuple(dict.fromkeys(names)) or DEFAULT_OUTPUTS[task]


def internal_outputs(names: Sequence[str], task: Task, offers: Sequence[str] = ("pooled",)
                     ) -> tuple[Output, ...]:
    """What an embedding request computes for the V2 outputs ``names``, once each."""
    have = _offered(task, offers)
    return tuple(dict.fromkeys(have[n] for n in names)) or ("pooled",)


def response_parameters(result: Measured) -> dict[str, int]:
    """An answer's parameters: ``prompt_tokens``, and ``truncated_inputs`` when the model cut
    texts at its token limit."""
    out = {"prompt_tokens": result.prompt_tokens}
    if result.truncated:
        out["truncated_inputs"] = result.truncated
    return out


def output_tensors(result: Measured, names: Sequence[str], mode: Mode = "label"
                   ) -> list[tuple[str, np.ndarray]]:
    """The answer's tensors by name, in the order asked for (every part's, for several
    outputs of one pass). A classifier's ``output-0`` is written as ``mode`` says
    (:mod:`serve_app.frontend.kserve`)."""
    out: dict[str, np.ndarray] = {}
    if isinstance(result, ChunkEmbedResult):  # late chunking: its offsets unless left out
        out[CHUNK_OFFSETS] = result.spans
        if tuple(names) == DEFAULT_OUTPUTS["embedding"]:
            names = (*names, CHUNK_OFFSETS)
    elif CHUNK_OFFSETS in names:
        raise InvalidInput(f"output '{CHUNK_OFFSETS}' answers late chunking (parameter chunks "
                           "or chunk_tokens)", param="outputs")
    parts = result.parts if isinstance(result, MultiEmbedResult) else (result,)
    for part in parts:
        _tensors_of(part, out, mode)
    return [(n, out[n]) for n in names]


def _tensors_of(result: Measured, out: dict[str, np.ndarray], mode: Mode) -> None:
    if isinstance(result, TokenEmbedResult):
        out.update(zip(MULTIVECTOR_OUTPUTS, (result.embeddings, result.offsets), strict=True))
    elif isinstance(result, EmbedResult):
        out[OUTPUT_NAME] = result.embeddings
    elif isinstance(result, RerankResult):
        out[SCORES_OUTPUT] = result.scores
    elif isinstance(result, SparseEmbedResult):
        out.update(zip(SPARSE_OUTPUTS, (result.indices, result.values, result.indptr),
                       strict=True))
    elif isinstance(result, ClassifyResult):
        out[SCORES_OUTPUT] = result.scores
        out[OUTPUT_NAME] = (labels_of(result.scores) if mode == "label"
                            else by_label_text(result.scores))


def internal_request(model: str, task: Task, tensors: Mapping[str, tuple[str, ...]],
                     params: Mapping[str, Any], request_id: str, version: str | None,
                     timeout_s: float | None = None, priority: int = 0,
                     mode: Mode = "label", outputs: tuple[Output, ...] = ("pooled",)
                     ) -> EmbedRequest | RerankRequest | ClassifyRequest:
    """The internal request of one V2 inference for a model doing ``task``: its input tensors'
    texts by name and its request ``parameters``; the ``timeout`` and ``priority`` parameters,
    when given, win over ``timeout_s`` and ``priority`` (the transport's own: headers,
    metadata). ``mode``: a classifier's answer (:func:`serve_app.frontend.kserve.classify_mode`),
    whose logits mode asks for logits; ``outputs``: what an embedding request computes
    (:func:`internal_outputs`)."""
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
    if task == "classify":
        if mode == "probabilities" and opts.raw_scores:
            raise InvalidInput("return_probabilities and raw_scores ask for two answers; "
                               "send one")
        return ClassifyRequest(inputs=classify_inputs(tensors),
                               raw_scores=opts.raw_scores or mode == "logits", **common)
    if len(tensors) != 1:
        raise InvalidInput(f"expected exactly one input tensor of texts, got {len(tensors)}")
    (texts,) = tensors.values()
    del common["truncate"]
    return EmbedRequest(inputs=texts, dimensions=opts.dimensions, prompt_name=opts.prompt_name,
                        input_type=opts.input_type, encoding=opts.encoding,
                        max_active_dims=opts.max_active_dims, long_inputs=opts.long_inputs,
                        chunks=opts.chunks, chunk_tokens=opts.chunk_tokens, outputs=outputs,
                        **common)


def classify_inputs(tensors: Mapping[str, tuple[str, ...]]) -> tuple[ClassifyInput, ...]:
    """A classifier's inputs: one tensor of texts (whatever its name), or ``text`` and
    ``text_pair`` of equal length (pairs)."""
    if len(tensors) == 1:
        (texts,) = tensors.values()
        out: tuple[ClassifyInput, ...] = texts
    elif set(tensors) == {INPUT_NAME, PAIR_INPUT}:
        firsts, seconds = tensors[INPUT_NAME], tensors[PAIR_INPUT]
        if len(firsts) != len(seconds):
            raise InvalidInput(f"inputs '{INPUT_NAME}' ({len(firsts)} texts) and "
                               f"'{PAIR_INPUT}' ({len(seconds)}) must pair up one to one")
        out = tuple(zip(firsts, seconds, strict=True))
    else:
        raise InvalidInput(f"a classifier takes one BYTES input of texts, or '{INPUT_NAME}' and "
                           f"'{PAIR_INPUT}' (pairs), got {sorted(tensors)}")
    return out


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
    inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
    if info.task == "rerank":
        inputs = [{"name": QUERY_INPUT, "datatype": "BYTES", "shape": [1]},
                  {"name": DOCUMENTS_INPUT, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": SCORES_OUTPUT, "datatype": "FP32", "shape": [-1]}]
    elif info.task == "classify":
        # pairs only: ``text_pair`` beside ``text``
        inputs.append({"name": PAIR_INPUT, "datatype": "BYTES", "shape": [-1]})
        outputs = [{"name": OUTPUT_NAME,
                    "datatype": "INT64" if info.kserve_output == "label" else "BYTES",
                    "shape": [-1]},
                   {"name": SCORES_OUTPUT, "datatype": "FP32", "shape": [-1, info.dim]}]
    elif info.task == "sparse":
        outputs = _SPARSE_META
    elif info.task == "multivector":
        outputs = _multivector_meta(info.dim)
    else:
        outputs = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, info.dim]}]
        if "sparse" in info.outputs:  # BGE-M3's heads
            outputs += _SPARSE_META
        if "multivector" in info.outputs:
            outputs += _multivector_meta(info.multivector_dim)
    return {"name": name, "versions": list(versions), "platform": PLATFORM, "inputs": inputs,
            "outputs": outputs}


_SPARSE_META = [{"name": n, "datatype": t, "shape": [-1]}
                for n, t in zip(SPARSE_OUTPUTS, ("INT32", "FP32", "INT64"), strict=True)]


def _multivector_meta(dim: int) -> list[dict[str, Any]]:
    return [{"name": MULTIVECTOR_OUTPUTS[0], "datatype": "FP32", "shape": [-1, dim]},
            {"name": MULTIVECTOR_OUTPUTS[1], "datatype": "INT64", "shape": [-1]}]


def model_parameters(info: ModelInfo) -> dict[str, Any]:
    """What REST metadata adds under ``parameters`` (gRPC's message has no room for it): the
    task, a variant's base, the engine and its measured fidelity, and for an embedding model
    its prompts, encodings and int8/uint8 ranges."""
    out: dict[str, Any] = {"task": info.task, "max_length": info.max_length}
    if info.variant_of is not None:  # loaded on first use; described by its base till then
        out["variant_of"] = info.variant_of
    if info.engine:
        out["engine"] = info.engine
    if info.task in ("rerank", "classify"):
        if info.task == "classify":
            out["labels"] = list(info.labels)
        return out
    out.update(prompts=dict(info.prompts), default_prompt=info.default_prompt,
               encodings=list(ENCODINGS) if info.task == "embedding" else ["float"],
               outputs=list(info.outputs))
    if info.task == "multivector":
        out["query_length"] = info.query_length
    if info.int8_ranges is not None:
        out["int8_ranges"] = {"min": info.int8_ranges[0], "max": info.int8_ranges[1],
                              "calibration_texts": info.calibration_texts}
    return out

