"""Where an ONNX Runtime or OpenVINO engine's graph comes from: the model directory's own files
(``onnx/model.onnx``, ``openvino/openvino_model.xml``, as many hub repositories ship them), or a
conversion of its torch weights, run once and kept on disk.

The conversion is ``torch.onnx.export`` of the transformers model with eager attention (the
graph ONNX Runtime and OpenVINO both ran fastest when the route was chosen), one ONNX file that both
backends read. It is cached under :func:`cache_root` in a directory named by a hash of the model
files and of the library versions that shape the graph, so a restart, another replica or another
model entry on the same files finds it, and a changed model file or a library upgrade converts
again. A conversion is written to a temporary directory and renamed into place, so replicas
converting at once never read a half-written file.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

from serve_app.engine.backends import BackendName, graph_inputs
from serve_app.errors import ModelLoadError

log = logging.getLogger(__name__)

#: bump when the exported graph changes shape, so old cache entries are not read
EXPORT_FORMAT = 1
GRAPH = "model.onnx"
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
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def conversion_key(digest: str, auto_class: str) -> str:
    """The cache directory name of the conversion, as ``auto_class``, of model files whose
    :func:`files_digest` is ``digest``."""
    parts = {"files": digest, "class": auto_class, "format": EXPORT_FORMAT,
             "torch": _version("torch"), "transformers": _version("transformers"),
             "onnx": _version("onnx")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def shipped_graph(model_dir: Path, backend: BackendName) -> Path | None:
    for rel in SHIPPED[backend]:
        path = model_dir / rel
        if path.is_file():
            return path
    return None


def graph_for(model_dir: Path, backend: BackendName, auto_class: str, digest: str,
              trust_remote_code: bool = False) -> tuple[Path, str]:
    """The graph file ``backend`` runs for ``model_dir`` (whose :func:`files_digest` is
    ``digest``) and where it came from (``shipped``, ``cached`` or ``converted``)."""
    found = shipped_graph(model_dir, backend)
    if found is not None:
        return found, "shipped"
    target = cache_root() / "engines" / conversion_key(digest, auto_class)
    graph = target / GRAPH
    if graph.is_file():
        return graph, "cached"
    export(model_dir, auto_class, target, trust_remote_code)
    return graph, "converted"


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            torch.onnx.export(_graph(model, names, output), example, str(tmp / GRAPH),
                              input_names=names, output_names=[output], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
        (tmp / "source.json").write_text(json.dumps(
            {"model_dir": str(model_dir), "class": auto_class, "output": output}))
        try:
            tmp.rename(target)
        except OSError:  # another replica finished first: its copy is as good
            if not (target / GRAPH).is_file():
                raise
    except Exception as e:
        raise ModelLoadError(f"cannot convert {model_dir} to ONNX: {type(e).__name__}: {e}"
                             ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model
        gc.collect()
    log.info("converted %s in %.2fs", model_dir, time.perf_counter() - t0)


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
