"""Where an ONNX Runtime or OpenVINO engine's graph comes from: the model directory's own files
(``onnx/model.onnx``, ``openvino/openvino_model.xml``, as many hub repositories ship them), or a
conversion of its torch weights, run once and kept on disk.

The conversion is ``torch.onnx.export`` of the transformers model with eager attention (the
graph ONNX Runtime and OpenVINO both ran fastest when the route was chosen). ONNX Runtime's
float engine runs a copy of it with ONNX Runtime's transformer fusions applied (attention,
skip-layer-norm, bias-GELU and embedding kernels that its session optimizer does not find in
this graph), kept beside it only where the fused graph answers as the plain one does
(:func:`fuse`); OpenVINO runs the same graph saved as OpenVINO IR (:func:`to_openvino`), whose
weights it maps from disk; int8 quantizes the plain graph.
A conversion is cached under :func:`cache_root` in a directory named by a hash of the model
files and of the library versions that shape the graph, so a restart, another replica or another
model entry on the same files finds it, and a changed model file or a library upgrade converts
again. ``precision: int8`` runs a dynamically quantized copy of the float graph (shipped or
converted), made once by ONNX Runtime's quantizer and cached the same way, keyed by the float
graph's own bytes and the quantizer's version. A conversion is written to a temporary
directory and renamed into place, so replicas converting at once never read a half-written
file.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from serve_app.engine.backends import BackendName, cpu_has_vnni, graph_inputs
from serve_app.errors import ModelLoadError

log = logging.getLogger(__name__)

#: bump when the exported graph changes shape, so old cache entries are not read
EXPORT_FORMAT = 3
GRAPH = "model.onnx"
FUSED_GRAPH = "model.fused.onnx"
#: the same graph as OpenVINO IR (float32 weights in its .bin), which OpenVINO maps from disk
OPENVINO_GRAPH = "openvino_model.xml"
#: how far a fused graph's outputs may stray from the plain graph's, relative to their scale
FUSED_TOLERANCE = 1e-4
INT8_GRAPH = "model.int8.onnx"
#: bump when the int8 quantization settings change
INT8_FORMAT = 2
#: the graphs a model directory may ship, per backend, in the order they are preferred
SHIPPED: dict[BackendName, tuple[str, ...]] = {
    "onnxruntime": ("onnx/model.onnx", "model.onnx"),
    "openvino": ("openvino/openvino_model.xml", "openvino_model.xml", "onnx/model.onnx",
                 "model.onnx"),
}
#: the model files a conversion depends on (tokenizer files do not change the graph)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def cache_root() -> Path:
    """``$SERVE_APP_CACHE``, else ``$XDG_CACHE_HOME/serve_app``, else ``~/.cache/serve_app``."""
    explicit = os.environ.get("SERVE_APP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "serve_app"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"


def files_digest(model_dir: Path) -> str:
    """sha256 over the config and weight files at the top of ``model_dir`` (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and (path.name == "config.json" or path.suffix in _WEIGHT_SUFFIXES):
            h.update(path.name.encode() + b"\0")
            _hash_file(h, path)
    return h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def conversion_key(digest: str, auto_class: str) -> str:
    """The cache directory name of the conversion, as ``auto_class``, of model files whose
    :func:`files_digest` is ``digest``."""
    parts = {"files": digest, "class": auto_class, "format": EXPORT_FORMAT,
             "torch": _version("torch"), "transformers": _version("transformers"),
             "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
             "openvino": _version("openvino")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def shipped_graph(model_dir: Path, backend: BackendName) -> Path | None:
    for rel in SHIPPED[backend]:
        path = model_dir / rel
        if path.is_file():
            return path
    return None


def float_graph(model_dir: Path, backend: BackendName, auto_class: str, digest: str,
                trust_remote_code: bool = False) -> tuple[Path, str]:
    """The float graph of ``model_dir`` (whose :func:`files_digest` is ``digest``) as shipped
    for ``backend``, else the plain ONNX graph of its conversion, and where it came from
    (``shipped``, ``cached`` or ``converted``)."""
    found = shipped_graph(model_dir, backend)
    if found is not None:
        return found, "shipped"
    target = cache_root() / "engines" / conversion_key(digest, auto_class)
    graph = target / GRAPH
    if graph.is_file():
        return graph, "cached"
    export(model_dir, auto_class, target, trust_remote_code)
    return graph, "converted"


#: the copy of a conversion each backend runs, where the conversion wrote one beside its graph
RUNS: dict[BackendName, str] = {"onnxruntime": FUSED_GRAPH, "openvino": OPENVINO_GRAPH}


def graph_for(model_dir: Path, backend: BackendName, auto_class: str, digest: str,
              trust_remote_code: bool = False) -> tuple[Path, str]:
    """The graph file ``backend`` runs for ``model_dir``: the shipped one, or its conversion's
    copy for ``backend`` (:data:`RUNS`) when there is one, else the conversion's plain graph;
    and where it came from (:func:`float_graph`)."""
    graph, source = float_graph(model_dir, backend, auto_class, digest, trust_remote_code)
    copy = graph.with_name(RUNS[backend]) if source != "shipped" else None
    return (copy, source) if copy is not None and copy.is_file() else (graph, source)


def int8_graph_for(model_dir: Path, auto_class: str, digest: str,
                   trust_remote_code: bool = False) -> tuple[Path, str]:
    """The dynamically quantized int8 graph of ``model_dir`` for ONNX Runtime and where it came
    from (``cached`` or ``quantized``): a quantization of the plain float ONNX graph
    (:func:`float_graph`; the quantizer finds no int8 matmuls in fused attention)."""
    source, _ = float_graph(model_dir, "onnxruntime", auto_class, digest, trust_remote_code)
    h = hashlib.sha256()
    _hash_file(h, source)
    reduce_range = not cpu_has_vnni()
    parts = {"graph": h.hexdigest(), "format": INT8_FORMAT, "reduce_range": reduce_range,
             "onnxruntime": _version("onnxruntime"), "onnx": _version("onnx")}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    target = cache_root() / "engines" / f"int8-{key}"
    graph = target / INT8_GRAPH
    if graph.is_file():
        return graph, "cached"
    quantize_int8(source, target, reduce_range)
    return graph, "quantized"


def quantize_int8(source: Path, target: Path, reduce_range: bool = False) -> None:
    """``target / model.int8.onnx``: the float ONNX graph ``source`` with its matmuls' weights
    quantized to signed int8 per output channel and their activations quantized at run time
    (ONNX Runtime's dynamic quantization). Of the settings tried (docs/benchmarks.md), this
    one agreed best with float32; per-tensor weights, unsigned weights and quantizing every
    operator (not only MatMul) lost more. ``reduce_range``: 7-bit weights, for CPUs without
    VNNI, whose 8-bit multiply-adds saturate on full-range weights (docs/benchmarks.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    log.info("quantizing %s to int8 (once; cached in %s)", source, target)
    with _staged(target, INT8_GRAPH, f"cannot quantize {source} to int8") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(source, tmp / INT8_GRAPH, weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul"],
                         reduce_range=reduce_range)
        (tmp / "source.json").write_text(json.dumps({"graph": str(source), "quantized": "int8"}))
    log.info("quantized %s in %.2fs", source, time.perf_counter() - t0)


def export(model_dir: Path, auto_class: str, target: Path, trust_remote_code: bool = False
           ) -> None:
    """Convert ``model_dir`` (loaded as transformers' ``auto_class``, float32, eager attention)
    to ``target / model.onnx``; the torch copy of the weights is freed before this returns."""
    import torch
    import transformers

    t0 = time.perf_counter()
    log.info("converting %s to ONNX (once; cached in %s)", model_dir, target)
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager",
            trust_remote_code=trust_remote_code).eval()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {model_dir} to convert it: {e}") from e
    names = graph_inputs(model.config)
    output = "logits" if auto_class != "AutoModel" else "last_hidden_state"
    example = tuple(torch.ones((2, 8), dtype=torch.int64) if n != "token_type_ids"
                    else torch.zeros((2, 8), dtype=torch.int64) for n in names)
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "tokens"} for n in names}
    axes[output] = {0: "batch", 1: "tokens"} if output == "last_hidden_state" else {0: "batch"}
    try:
        with _staged(target, GRAPH, f"cannot convert {model_dir} to ONNX") as tmp, \
                warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(_graph(model, names, output), example, str(tmp / GRAPH),
                              input_names=names, output_names=[output], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
            fused = fuse(tmp / GRAPH, tmp / FUSED_GRAPH, model.config)
            ir = to_openvino(tmp / GRAPH, tmp / OPENVINO_GRAPH)
            (tmp / "source.json").write_text(json.dumps(
                {"model_dir": str(model_dir), "class": auto_class, "output": output,
                 "fused": fused, "openvino": ir}))
    finally:
        del model
        gc.collect()
    log.info("converted %s in %.2fs", model_dir, time.perf_counter() - t0)


def fuse(graph: Path, target: Path, model_config: Any) -> bool:
    """Write ``graph`` with ONNX Runtime's transformer fusions to ``target``, if they apply and
    the fused graph answers as ``graph`` does (every output within :data:`FUSED_TOLERANCE` of
    its scale, on a padded batch, padding positions aside); False, and nothing written, if not.
    A model whose layers the fusions do not recognize stays unfused, which is only slower."""
    import numpy as np
    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    try:
        with contextlib.redirect_stdout(None), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fused = optimize_model(
                str(graph), model_type="bert", opt_level=1, use_gpu=False,
                # read from the config: the optimizer's own guess misses small models' heads
                num_heads=int(getattr(model_config, "num_attention_heads", 0) or 0),
                hidden_size=int(getattr(model_config, "hidden_size", 0) or 0))
            if not any(fused.get_fused_operator_statistics().values()):
                return False
            size = sum(f.stat().st_size for f in graph.parent.iterdir() if f.is_file())
            fused.save_model_to_file(str(target), use_external_data_format=size > 1 << 30)
    except Exception as e:  # the optimizer raises what its pattern matchers meet
        log.info("ONNX Runtime's fusions do not apply to %s (%s: %s): it runs unfused",
                 graph, type(e).__name__, e)
        target.unlink(missing_ok=True)
        return False
    names = graph_inputs(model_config)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, max(2, int(getattr(model_config, "vocab_size", 100) or 100)),
                       size=(3, 13), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    feeds = {n: feeds[n] for n in names}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    plain, new = (ort.InferenceSession(str(g), options, providers=["CPUExecutionProvider"])
                  .run(None, feeds)[0] for g in (graph, target))
    if plain.ndim == 3:  # token outputs: positions under the mask are pooled by no one
        keep = mask.astype(bool)
        plain, new = plain[keep], new[keep]
    scale = max(1.0, float(np.abs(plain).max()))
    err = float(np.abs(plain - new).max()) if plain.shape == new.shape else float("inf")
    if err > FUSED_TOLERANCE * scale:
        log.warning("ONNX Runtime's fusions change %s's outputs (max difference %.2g): it runs "
                    "unfused", graph, err)
        target.unlink()
        return False
    return True


def to_openvino(graph: Path, target: Path) -> bool:
    """Write ``graph`` as OpenVINO IR to ``target`` (its weights in float32 in the .bin beside
    it); False, and nothing written, where OpenVINO is not installed. Compiled from an ONNX
    file, OpenVINO keeps a copy of the weights it read in the process's own memory; from IR it
    maps them from the file, pages the kernel shares between the replicas of a node and can
    drop, and a start skips converting the ONNX graph again."""
    try:
        import openvino as ov
    except ImportError:
        return False
    ov.save_model(ov.convert_model(str(graph)), str(target), compress_to_fp16=False)
    return True


@contextlib.contextmanager
def _staged(target: Path, graph: str, failure: str) -> Iterator[Path]:
    """A temporary directory beside ``target`` to write into, renamed to ``target`` when the
    block ends well (another replica's finished copy, already there, is as good); whatever the
    block raises becomes a ModelLoadError starting with ``failure``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        try:
            tmp.rename(target)
        except OSError:
            if not (target / graph).is_file():
                raise
    except Exception as e:
        raise ModelLoadError(f"{failure}: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _graph(model: Any, names: list[str], output: str) -> Any:
    """A module calling the transformers ``model`` with positional feeds (the exporter traces
    positional arguments) and answering its one ``output``."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *feeds: torch.Tensor) -> torch.Tensor:
            return getattr(self.model(**dict(zip(names, feeds, strict=True))), output)

    return Graph()
