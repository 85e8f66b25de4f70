"""Engine backends: one forward pass of a model's transformer graph, on torch, ONNX Runtime or
OpenVINO. No Ray, no HTTP.

Every backend takes the same feeds (int64 ``input_ids``, ``attention_mask`` and, where the graph
declares it, ``token_type_ids``, all ``[b, L]``) and answers the graph's one output as a float32
torch tensor on the model's device: the last hidden state ``[b, L, d]`` of an embedding model,
the logits ``[b, labels]`` of a cross-encoder. Pooling, normalizing and activations stay in the
engine (:mod:`.embedding`, :mod:`.reranker`), written once for every backend; this module only
runs graphs. Where a graph comes from (a model directory's own ``onnx/`` or ``openvino/`` files,
or a cached conversion) is :mod:`.convert`'s business.

Threads: a replica runs ``passes`` forward passes at once on ``threads`` CPU threads in all
(:func:`serve_app.engine.embedding.plan_parallelism`). torch keeps its thread count per calling
thread, so each call says it; an ONNX Runtime session runs concurrent calls, each on its own
``threads // passes`` intra-op threads; an OpenVINO model is compiled with one stream per pass on
``threads`` threads, each forward thread holding its own infer request. Neither pins threads to
cores, so two replicas on one node share it instead of fighting over the same cores.
"""

from __future__ import annotations

import logging
import platform
import threading
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)

#: each backend is also the name of the Python package it needs
BackendName = Literal["torch", "onnxruntime", "openvino"]

#: the graph outputs an engine reads, by the name exporters give them
OUTPUT_NAMES = ("last_hidden_state", "logits", "token_embeddings")


def installed(name: BackendName) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def graph_inputs(model_config: Any) -> list[str]:
    """The feeds a transformers model of ``model_config`` takes: token types only where it has
    them (BERT does, most newer encoders do not)."""
    names = ["input_ids", "attention_mask"]
    if getattr(model_config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


class Backend(Protocol):
    """One loaded graph. ``name`` is one of :data:`BackendName`; ``precision`` the dtype its math
    runs in (``float32``, ``bfloat16``, ``float16``, or ``int8``: a dynamically quantized graph);
    ``input_names`` the feeds it takes."""

    name: BackendName
    precision: str
    input_names: tuple[str, ...]
    #: whether a call's ``threads`` are honoured (torch); the others fixed theirs at load
    threads_per_call: bool

    def run(self, feeds: dict[str, np.ndarray], threads: int | None = None) -> torch.Tensor:
        """The graph's output for ``feeds``, float32, on the model's device. ``threads``: the
        torch threads this call runs on (torch alone reads it: the others fixed theirs at
        load)."""
        ...

    def describe(self) -> str:
        """What runs, for logs and model metadata, e.g. ``openvino bfloat16``."""
        ...


class TorchBackend:
    """A transformers model in eager torch, on its device and dtype."""

    name: BackendName = "torch"
    threads_per_call = True

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.precision = str(dtype).removeprefix("torch.")
        self.input_names = tuple(graph_inputs(model.config))

    def run(self, feeds: dict[str, np.ndarray], threads: int | None = None) -> torch.Tensor:
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in feeds.items()
                   if k in self.input_names}
        with torch.inference_mode():
            out = self.model(**tensors)
        found = getattr(out, "last_hidden_state", None)
        return (found if found is not None else out.logits).float()

    def describe(self) -> str:
        return f"torch {self.precision} on {self.device}"


def _output_index(names: list[str]) -> int:
    for wanted in OUTPUT_NAMES:
        if wanted in names:
            return names.index(wanted)
    return 0


class OnnxRuntimeBackend:
    """An ONNX graph in an ONNX Runtime CPU session, ``threads`` intra-op threads per call."""

    name: BackendName = "onnxruntime"
    threads_per_call = False

    def __init__(self, path: Path, threads: int, precision: str = "float32") -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle threads sleep instead of spinning: a replica's other pass and its tokenizer
        # share these cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options,
                                            providers=["CPUExecutionProvider"])
        self.precision = precision
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = [outputs[_output_index(outputs)]]

    def run(self, feeds: dict[str, np.ndarray], threads: int | None = None) -> torch.Tensor:
        out = self.session.run(self._output, {k: feeds[k] for k in self.input_names})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def describe(self) -> str:
        return f"onnxruntime {self.precision} on cpu"


class OpenVinoBackend:
    """A graph (OpenVINO IR or ONNX) compiled for the CPU: one stream per forward pass at once,
    ``threads`` in all; ``precision`` float32 or bfloat16 (only where the CPU has it natively)."""

    name: BackendName = "openvino"
    threads_per_call = False

    def __init__(self, path: Path, passes: int, threads: int, precision: str = "float32") -> None:
        import openvino as ov

        hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
        self.compiled = ov.Core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": hint,
            "NUM_STREAMS": str(max(1, passes)),
            "INFERENCE_NUM_THREADS": str(max(1, threads)),
            "ENABLE_CPU_PINNING": False,
        })
        self.precision = precision
        self.input_names = tuple(i.get_any_name() for i in self.compiled.inputs)
        outputs = [o.get_any_name() for o in self.compiled.outputs]
        self._output = self.compiled.outputs[_output_index(outputs)]
        self._local = threading.local()

    def run(self, feeds: dict[str, np.ndarray], threads: int | None = None) -> torch.Tensor:
        request = getattr(self._local, "request", None)
        if request is None:  # infer requests are not thread-safe: one per forward thread
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({k: feeds[k] for k in self.input_names})
        # a view of the request's own buffer, valid until its next call on this thread; the
        # engine pools it before then
        return torch.from_numpy(result[self._output])

    def describe(self) -> str:
        return f"openvino {self.precision} on cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies int8 with int32 sums (AVX512-VNNI, AVX-VNNI or AMX), which
    ONNX Runtime's int8 matmuls need to keep full 8-bit weights from saturating; any non-x86
    CPU answers True (its int8 kernels do not saturate so)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return True


#: the order ``backend: auto`` tries on CPU, fastest first (bench/run.py's table of engines in
#: process: docs/benchmarks.md)
CPU_ORDER: tuple[BackendName, ...] = ("openvino", "onnxruntime", "torch")


def choose(backend: str, precision: str, dtype: str, device: torch.device
           ) -> tuple[BackendName, str, str]:
    """(backend, precision, compute dtype) for a model's ``backend``, ``precision`` and torch
    ``dtype`` settings on ``device`` (see ``ModelConfig.backend``)."""
    from serve_app.errors import ModelLoadError

    if dtype != "auto":  # a torch dtype named: the torch engine, its precision implied
        return "torch", "exact" if dtype == "float32" else "fast", dtype
    if precision == "auto":
        precision = "fast" if device.type == "cuda" else "exact"
    if precision == "int8":  # the config refuses int8 with another backend or on cuda
        if device.type == "cuda":
            raise ModelLoadError("precision int8 runs on CPU; on GPU use precision fast")
        if not installed("onnxruntime"):
            raise ModelLoadError("precision int8 needs onnxruntime (pip install onnxruntime)")
        return "onnxruntime", "int8", "float32"
    if device.type == "cuda":
        if backend not in ("auto", "torch"):
            raise ModelLoadError(f"backend {backend} runs on CPU here; on GPU use torch")
        return "torch", precision, "float16" if precision == "fast" else "float32"
    if backend == "auto":
        backend = next(b for b in CPU_ORDER if installed(b))
    elif not installed(backend):  # type: ignore[arg-type]
        raise ModelLoadError(f"backend {backend} is not installed (pip install {backend})")
    native = precision == "fast" and cpu_has_bf16()
    if precision == "fast" and not native:
        log.info("precision fast: this CPU has no native bfloat16 (AVX512-BF16 or AMX), "
                 "so %s runs float32", backend)
    if backend == "onnxruntime" and native:
        # ONNX Runtime's CPU kernels have no bfloat16 matmuls: float32 it is
        log.info("precision fast: onnxruntime has no native bfloat16 on CPU; it runs float32")
        native = False
    return backend, precision, "bfloat16" if native else "float32"  # type: ignore[return-value]
