"""Open Inference (V2) rules shared by the REST and gRPC adapters: tensors, parameters, metadata.

BYTES elements on the wire: each a 4-byte little-endian length, then that many bytes. Text inputs
are one BYTES tensor of shape ``[n]`` or ``[n, 1]``; the output ``output-0`` is FP32 ``[n, dim]``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve_app.errors import InvalidInput

PLATFORM = "serve_app_huggingface"
INPUT_NAME = "text"
OUTPUT_NAME = "output-0"
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
        if not e:
            raise InvalidInput(f"input '{name}' element {i} is an empty string")
        texts.append(e)
    return tuple(texts)


@dataclass(frozen=True)
class InferOptions:
    """Request parameters serve_app honours on both V2 transports."""

    dimensions: int | None = None
    truncate: bool = True
    timeout_s: float | None = None


def infer_options(params: Mapping[str, Any]) -> InferOptions:
    """Read ``dimensions`` (int), ``truncate`` (bool) and ``timeout`` (int microseconds, as in
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
    return InferOptions(dimensions=dims, truncate=truncate,
                        timeout_s=None if timeout is None else timeout / 1e6)


def check_outputs(names: Sequence[str]) -> None:
    for n in names:
        if n != OUTPUT_NAME:
            raise InvalidInput(f"unknown output '{n}'; this model has one output, '{OUTPUT_NAME}'")


def model_metadata(name: str, versions: Sequence[str], dim: int) -> dict[str, Any]:
    """The model metadata answer, as a dict of both transports' field names."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, dim]}],
    }
