"""What KServe's HuggingFace runtime answers for the tasks beyond embedding, shared by the V1
and V2 adapters (:mod:`serve_app.frontend.http.kserve_v1`, :mod:`serve_app.frontend.v2`).

A sequence classifier (KServe's ``--task sequence_classification``) answers, per input, by the
model's ``kserve_output`` (KServe's flags) or the request's ``return_probabilities`` /
``return_raw_logits`` parameter:

- ``label``: the index of its best label (KServe's default); V1 ``[1, 0]``, V2 ``output-0``
  INT64 ``[n]``;
- ``probabilities`` / ``logits``: each label index's probability (or logit); V1
  ``[{"0": 0.01, "1": 0.99}]``, V2 ``output-0`` BYTES ``[n]``, each element the text of that
  mapping as KServe writes it (``{0: 0.01, 1: 0.99}``).

A sparse model answers V1 ``[{"indices": [...], "values": [...]}]`` (serve_app's own: KServe
has no sparse task).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from serve_app.errors import InvalidInput
from serve_app.frontend.dataplane import DataPlane
from serve_app.frontend.registry import ServedModel
from serve_app.types import SparseEmbedResult

Mode = Literal["label", "probabilities", "logits"]
#: the request parameters that pick a mode, and the mode each picks
MODE_PARAMETERS: dict[str, Mode] = {"return_probabilities": "probabilities",
                                    "return_raw_logits": "logits"}


async def classify_mode(dataplane: DataPlane, model: ServedModel,
                        params: Mapping[str, Any]) -> Mode:
    """The answer a request to a classifier asks for (``params``: its V1 body or V2
    parameters), else the model's ``kserve_output``; ``label`` for another model (its
    parameters unread)."""
    if model.task != "classify":
        return "label"
    default = (await dataplane.info(model, wait=True)).kserve_output
    asked = []
    for key, mode in MODE_PARAMETERS.items():
        value = params.get(key, False)
        if type(value) is not bool:
            raise InvalidInput(f"'{key}' must be true or false, got {value!r}", param=key)
        if value:
            asked.append(mode)
    if len(asked) > 1:
        raise InvalidInput("ask for return_probabilities or return_raw_logits, not both",
                           param="return_raw_logits")
    return asked[0] if asked else default  # type: ignore[return-value]


def labels_of(scores: np.ndarray) -> np.ndarray:
    """Each row's best label index, int64 ``[n]``."""
    return scores.argmax(axis=1).astype(np.int64)


def by_label(scores: np.ndarray) -> list[dict[str, float]]:
    """Each row as ``{"label index": score}`` (V1's JSON keys are text)."""
    return [{str(j): float(v) for j, v in enumerate(row)} for row in scores.tolist()]


def by_label_text(scores: np.ndarray) -> np.ndarray:
    """Each row as the text of a ``{index: score}`` mapping, as KServe's V2 BYTES output
    writes it: object ``[n]`` of bytes."""
    return np.array([str(dict(enumerate(row))).encode() for row in scores.tolist()],
                    dtype=object)


def v1_predictions(scores: np.ndarray, mode: Mode) -> list[Any]:
    return labels_of(scores).tolist() if mode == "label" else by_label(scores)


def sparse_objects(result: SparseEmbedResult) -> list[dict[str, Any]]:
    """Each row as ``{"indices": [int], "values": [float]}``."""
    rows = []
    for i in range(len(result.indptr) - 1):
        indices, values = result.row(i)
        rows.append({"indices": indices, "values": values})
    return rows
