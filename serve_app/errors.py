"""Domain errors. No status codes here: each protocol maps these, once, to its own wire form."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ServeAppError(Exception):
    """Base of every error a caller may see. ``message`` is safe to show to the caller.
    ``variants``: the :class:`serve_app.types.VariantReport` of the model replica that raised
    it, when that replica serves variants (an answer that is an error reports them too)."""

    variants: Any = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def kind(self) -> str:
        """The error's name in metrics (``serve_app_errors_total{kind}``)."""
        return type(self).__name__

    def __reduce__(self):  # keep ``param`` and ``variants`` across Ray's pickling
        return (type(self), (self.message, self.param), {"variants": self.variants})


class InvalidInput(ServeAppError):
    """The request is malformed or asks for something the model cannot do."""


class EmptyInput(InvalidInput):
    """The request holds nothing to compute: no inputs, or an empty one (text-embeddings-inference
    answers these apart from other invalid input)."""

    kind = "InvalidInput"


class WrongTask(InvalidInput):
    """The model is served, but for another task than the request's (an embedding request to a
    reranker)."""

    kind = "InvalidInput"


class Unauthorized(ServeAppError):
    """No API key, or not one of the configured keys."""


class ModelNotFound(ServeAppError):
    """No model is served under the requested name."""


class ModelNotReady(ServeAppError):
    """The model exists but is not loaded yet, or has no live replica."""


class Misrouted(ModelNotReady):
    """A variant's request reached a model replica that does not hold it while another does: the
    ingress sends it again (:class:`serve_app.serve.handles.VariantBackend` says why)."""


class Overloaded(ServeAppError):
    """Too much work is queued; retry later."""


class DeadlineExceeded(ServeAppError):
    """The request's own deadline passed before its answer was ready."""


class PayloadTooLarge(ServeAppError):
    """The request body exceeds the configured limit."""


class InferenceFailed(ServeAppError):
    """The model failed on valid input: a server fault."""


def lookup(table: Mapping[type[ServeAppError], T], err: ServeAppError, default: T) -> T:
    """``table``'s entry for the most specific class of ``err`` that it names, else ``default``.
    Each protocol keeps one such table from domain error to its own status."""
    for cls in type(err).__mro__:
        if cls in table:
            return table[cls]
    return default


#: what each task's model is, and what to send it (the :data:`serve_app.types.Task` names)
TASK_NAMES = {"embedding": "an embedding model", "rerank": "a reranker",
              "classify": "a classifier", "sparse": "a sparse (SPLADE) embedding model",
              "multivector": "a multi-vector (ColBERT) embedding model"}
_TASK_USE = {
    "embedding": "embed texts with it (/v1/embeddings, /embed, V1 or V2)",
    "rerank": "send it (query, documents) on /rerank, /v1/rerank or V2",
    "classify": "classify texts with it (/predict, /v1/classify, V1 or V2)",
    "sparse": "embed texts with it (/embed_sparse, /v1/embeddings, V1 or V2)",
    "multivector": "embed texts with it (/embed_all, /v1/embeddings, V2) or score documents "
                   "(/rerank)",
}


def wrong_task(model: str, task: str, wanted: str) -> WrongTask:
    """The error for a request for ``wanted`` (a task) to a model of another ``task``."""
    return WrongTask(f"model {model!r} is {TASK_NAMES.get(task, task)}, not "
                     f"{TASK_NAMES.get(wanted, wanted)}: {_TASK_USE.get(task, '')}",
                     param="model")


class ModelLoadError(Exception):
    """A model could not be resolved or loaded (raised at start-up, not per request)."""
