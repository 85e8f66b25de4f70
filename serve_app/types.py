"""The internal request and result types: the only objects that cross from ingress to replica.

They are frozen, hold plain Python and numpy values, and pickle cheaply; no FastAPI, pydantic or
protobuf object ever reaches a model replica.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from serve_app.errors import InvalidInput

#: One input: a text, or the model tokenizer's complete token ids for one text.
Input = str | tuple[int, ...]
#: One input to a classifier: a text, or a pair of texts (a sentence pair, as NLI models take).
ClassifyInput = str | tuple[str, str]


def chars(inputs: Sequence[ClassifyInput]) -> int:
    """The characters of texts and text pairs (what decides where they are tokenized, and
    text-embeddings-inference's ``x-compute-characters``)."""
    return sum(len(x) if isinstance(x, str) else len(x[0]) + len(x[1]) for x in inputs)


#: What a model does: embed texts into dense vectors, score (query, document) pairs (a
#: cross-encoder), classify texts or text pairs (a sequence classifier), or embed texts into
#: sparse vocabulary-sized vectors (SPLADE), or into one vector per token (ColBERT, PyLate).
Task = Literal["embedding", "rerank", "classify", "sparse", "multivector"]
TASKS: tuple[Task, ...] = ("embedding", "rerank", "classify", "sparse", "multivector")
#: What an embedding request answers: the model's own vectors (``pooled``: a dense model's one
#: vector per input, a SPLADE model's sparse one, a multi-vector model's matrix), or one of a
#: model's other outputs: every token's last hidden state (``tokens``,
#: text-embeddings-inference's ``/embed_all``), sparse lexical weights (``sparse``) or
#: late-interaction vectors (``multivector``), as BGE-M3 answers them (:attr:`ModelInfo.outputs`
#: lists a model's).
Output = Literal["pooled", "tokens", "sparse", "multivector"]
#: How vectors are answered: float32, or quantized as sentence-transformers' ``quantize_embeddings``
#: does (int8/uint8: one byte per value on fixed per-dimension ranges; binary/ubinary: sign bits
#: packed 8 to a byte, as int8 offset by -128 or as uint8).
Encoding = Literal["float", "int8", "uint8", "binary", "ubinary"]
#: Which end of an over-long input truncation cuts (text-embeddings-inference's
#: ``truncation_direction``): the end (right, the default) or the start (left).
Side = Literal["right", "left"]
ENCODINGS: tuple[Encoding, ...] = ("float", "int8", "uint8", "binary", "ubinary")
#: What becomes of a text longer than the model's token limit: cut at the limit, as
#: sentence-transformers does (``truncate``); embedded whole in windows of the limit whose
#: vectors are averaged, weighted by their tokens (``chunk``); or refused (``error``).
LongInputs = Literal["truncate", "chunk", "error"]
LONG_INPUTS: tuple[LongInputs, ...] = ("truncate", "chunk", "error")
#: ``input_type`` values callers send (Cohere, NVIDIA NIM, nomic) and the prompt names they mean,
#: the model's own name first.
INPUT_TYPES: dict[str, tuple[str, ...]] = {
    "query": ("query", "search_query"),
    "search_query": ("search_query", "query"),
    "document": ("document", "search_document", "passage"),
    "search_document": ("search_document", "document", "passage"),
}
#: The priority of requests that name none (Triton's 0): the highest, interactive one.
DEFAULT_PRIORITY = 1
#: The lowest priority level a request may name (levels are 1 to this; 0 means the default).
MAX_PRIORITY = 1000
#: The priority bulk work takes unless told otherwise: the bulk client's batches wait below
#: interactive requests (level 1, the default), so a running job never delays search; the Ray
#: Data job's workers run at the matching CPU niceness (:func:`serve_app.tools.offline.niceness`).
BULK_PRIORITY = 10
#: The prompt name that adds no prompt, not even the model's default.
NO_PROMPT = ""


def priority(value: Any, where: str = "priority", text: bool = False) -> int:
    """A request's priority level from the wire (an int; with ``text``, a header's digits): 0
    (the default) to :data:`MAX_PRIORITY`; anything else is :class:`InvalidInput` naming
    ``where``."""
    if text and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if type(value) is not int or not 0 <= value <= MAX_PRIORITY:
        raise InvalidInput(f"{where} must be an integer from 0 (the default, highest level) to "
                           f"{MAX_PRIORITY} (1 is the highest level), got {value!r}",
                           param="priority")
    return value


def long_inputs(value: Any, truncate: Any = None) -> LongInputs | None:
    """A request's ``long_inputs`` from the wire (None: the model's default); when it names
    none, a ``truncate`` boolean (text-embeddings-inference's field) means ``truncate``
    (true) or ``error`` (false)."""
    if value is not None:
        if value not in LONG_INPUTS:
            raise InvalidInput(f"long_inputs must be one of {', '.join(LONG_INPUTS)}, got "
                               f"{value!r}", param="long_inputs")
        return value
    if truncate is None:
        return None
    if type(truncate) is not bool:
        raise InvalidInput(f"truncate must be true or false, got {truncate!r}",
                           param="truncate")
    return "truncate" if truncate else "error"


def late_chunking(chunks: Any, chunk_tokens: Any
                  ) -> tuple[tuple[tuple[int, int], ...] | None, int | None]:
    """A request's late chunking from the wire: ``chunks``, a non-empty list of ``[start,
    end]`` character offsets, or ``chunk_tokens``, a positive number of tokens; not both."""
    if chunks is not None and chunk_tokens is not None:
        raise InvalidInput("give chunks or chunk_tokens, not both", param="chunks")
    if chunk_tokens is not None:
        if type(chunk_tokens) is not int or chunk_tokens < 1:
            raise InvalidInput(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}",
                               param="chunk_tokens")
        return None, chunk_tokens
    if chunks is None:
        return None, None
    pairs = list(chunks) if isinstance(chunks, (list, tuple)) else None
    if not pairs or not all(isinstance(c, (list, tuple)) and len(c) == 2
                            and all(type(x) is int for x in c) for c in pairs):
        raise InvalidInput("chunks must be a non-empty list of [start, end] character offsets",
                           param="chunks")
    return tuple((int(a), int(b)) for a, b in pairs), None


def deadline(seconds: float | None) -> float | None:
    """The wall-clock deadline ``seconds`` from now (None: none)."""
    return None if seconds is None else time.time() + seconds


class _Request:
    """What every internal request derives from its ``deadline`` and ``priority``."""

    __slots__ = ()
    deadline: float | None
    priority: int

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once passed); None without one."""
        return None if self.deadline is None else self.deadline - time.time()

    @property
    def effective_priority(self) -> int:
        """The priority its texts wait at: ``priority``, 0 meaning the default."""
        return self.priority or DEFAULT_PRIORITY


@dataclass(frozen=True, slots=True)
class EmbedRequest(_Request):
    """Embed ``inputs`` with model ``model``.

    - ``inputs``: non-empty; each a ``str`` or a tuple of token ids (special tokens included).
    - ``long_inputs``: what becomes of a text over the model's token limit (:data:`LongInputs`);
      None: the model's configured default.
    - ``dimensions``: keep the first N values of each vector and L2-normalize again.
    - ``version``: the model version (V2); None: the name's default version.
    - ``prompt_name``: one of the model's prompts (``config_sentence_transformers.json``) put
      before each text; None: the model's default prompt, if it has one; ``NO_PROMPT``: none.
    - ``input_type``: ``query`` or ``document`` (or ``search_query``/``search_document``): the
      data plane turns it into the ``prompt_name`` the model has for it.
    - ``encoding``: float32 vectors, or one of the compact encodings.
    - ``normalize``: L2-normalize the vectors (True), answer them as pooled (False), or as the
      model's own config says (None, the default).
    - ``truncation_side``: which end of an over-long text truncation cuts.
    - ``outputs``: what to answer (:data:`Output`): usually one; a model with several
      outputs (BGE-M3) answers several from one forward pass. ``tokens`` takes no pooling,
      normalizing, dimensions or encodings.
    - ``max_active_dims``: a sparse model's vectors keep only their largest N values.
    - ``max_answer_bytes``: the most bytes of per-token vectors (``tokens``, ``multivector``)
      its answer may hold, counted once tokenized, before any pass (the data plane sets the
      payload limit); more is :class:`PayloadTooLarge`.
    - ``chunks`` / ``chunk_tokens``: late chunking of the one input, a text: one vector per
      chunk, each the pooling of that chunk's tokens' outputs from a pass over the whole
      text (in overlapping windows of the model's limit when longer). ``chunks``: ``[start,
      end)`` character offsets into the text; ``chunk_tokens``: cut it every N tokens.
    - ``priority``: where its texts wait in the replica's queue, as in Triton: 1 the
      highest, larger numbers lower, 0 the default (1, interactive).
    - ``request_id``: the caller's id, for logs.
    - ``deadline``: wall-clock time (``time.time()``) after which the answer is useless; work
      still queued then is dropped and the caller gets :class:`DeadlineExceeded`.
    """

    model: str
    inputs: tuple[Input, ...]
    long_inputs: LongInputs | None = None
    dimensions: int | None = None
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None
    prompt_name: str | None = None
    input_type: str | None = None
    encoding: Encoding = "float"
    priority: int = 0
    normalize: bool | None = None
    truncation_side: Side = "right"
    outputs: tuple[Output, ...] = ("pooled",)
    max_active_dims: int | None = None
    chunks: tuple[tuple[int, int], ...] | None = None
    chunk_tokens: int | None = None
    max_answer_bytes: int | None = None

    @property
    def output(self) -> Output:
        """The first output asked for (the only one, but for a model with several)."""
        return self.outputs[0]

    @property
    def late_chunking(self) -> bool:
        return self.chunks is not None or self.chunk_tokens is not None


@dataclass(frozen=True, slots=True)
class RerankRequest(_Request):
    """Score each of ``documents`` against ``query`` with reranker ``model``.

    ``raw_scores``: the model's logits instead of its activation (sigmoid for one-label
    cross-encoders); ``truncate``: cut a (query, document) pair longer than the model's limit
    the way sentence-transformers does (longest first), or refuse it; ``truncation_side``:
    which end of the longer part it cuts. Other fields as in :class:`EmbedRequest`.
    """

    model: str
    query: str
    documents: tuple[str, ...]
    raw_scores: bool = False
    truncate: bool = True
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None
    priority: int = 0
    truncation_side: Side = "right"


@dataclass(frozen=True, slots=True)
class ClassifyRequest(_Request):
    """Classify each of ``inputs`` (a text, or a pair of texts) with sequence classifier
    ``model``: per input, a score for each of the model's labels (its config's ``id2label``).

    ``raw_scores``: the logits instead of the probabilities (softmax over the labels; sigmoid
    for a multi-label or one-label model, as transformers' text-classification pipeline
    applies them); ``truncate``: cut an input longer than the model's limit (a pair longest
    first) or refuse it; ``truncation_side``: which end it cuts. Other fields as in
    :class:`EmbedRequest`."""

    model: str
    inputs: tuple[ClassifyInput, ...]
    raw_scores: bool = False
    truncate: bool = True
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None
    priority: int = 0
    truncation_side: Side = "right"


@dataclass(frozen=True, slots=True)
class TokenizeRequest(_Request):
    """Tokenize ``texts`` with model ``model``'s tokenizer, as it tokenizes them to embed
    (``prompt_name`` as in :class:`EmbedRequest`; with ``add_special_tokens`` false, without
    its special tokens), never truncating: text-embeddings-inference's ``/tokenize``."""

    model: str
    texts: tuple[str, ...]
    add_special_tokens: bool = True
    prompt_name: str | None = None
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class DecodeRequest(_Request):
    """Turn each of ``ids`` (token-id sequences) back into text with model ``model``'s
    tokenizer, leaving out its special tokens when ``skip_special_tokens``."""

    model: str
    ids: tuple[tuple[int, ...], ...]
    skip_special_tokens: bool = True
    request_id: str = ""
    deadline: float | None = None
    version: str | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Token:
    """One token of a tokenized text: its ``id``, its ``text`` (the text's own characters, or
    for a special token its name), ``special``, and for a token of the text, where it is:
    ``start`` and ``stop``, UTF-8 byte offsets into the text (None for special tokens)."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


@dataclass(frozen=True, slots=True)
class TokenizeResult:
    """The tokens of each text, in request order."""

    tokens: tuple[tuple[Token, ...], ...]


@dataclass(frozen=True, slots=True)
class DecodeResult:
    """One text per token-id sequence, in request order."""

    texts: tuple[str, ...]



@dataclass(frozen=True, slots=True)
class VariantReport:
    """What a replica serving variants (:mod:`serve_app.runtime.variants`) did since its previous
    report: ``loads`` as (variant, seconds, loaded or failed), ``evictions`` (variants unloaded),
    and the variants it holds now, ``resident``. ``base`` is the entry's base model name,
    ``replica`` the model replica's id."""

    base: str
    replica: str
    resident: tuple[str, ...] = ()
    loads: tuple[tuple[str, float, bool], ...] = ()
    evictions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Measured:
    """What the replica measured for one answer. ``token_counts``: int64 ``[n]``, the tokens
    each input (text, or query and document pair) used after truncation, special tokens and
    prompt included; ``truncated`` inputs; seconds spent tokenizing, waiting for a forward pass
    (``queue_s``) and in forward passes (``inference_s``); and ``passes``, the forward passes
    the replica finished since its previous answer as (inputs, tokens) pairs, so every pass is
    reported exactly once, whichever answer carries it; the same for ``variants``, from a
    replica that serves variants."""

    token_counts: np.ndarray
    truncated: int = 0
    tokenize_s: float = 0.0
    queue_s: float = 0.0
    inference_s: float = 0.0
    passes: tuple[tuple[int, int], ...] = ()
    variants: VariantReport | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.token_counts.sum())


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbedResult(Measured):
    """``embeddings`` ``[n, dim]`` in input order: float32, or for a compact encoding int8 /
    uint8 (``[n, dim]``; binary and ubinary ``[n, ceil(dim / 8)]``)."""

    embeddings: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class SparseEmbedResult(Measured):
    """A sparse model's vectors, row ``i`` in ``indices[indptr[i]:indptr[i + 1]]`` (int32
    vocabulary ids, ascending) and ``values`` (float32, non-zero) at the same positions:
    compressed sparse rows of ``[n, dim]``, ``dim`` the vocabulary size."""

    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    dim: int

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``'s (indices, values)."""
        a, b = int(self.indptr[i]), int(self.indptr[i + 1])
        return self.indices[a:b], self.values[a:b]


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenEmbedResult(Measured):
    """Every token's vector: input ``i``'s float32 ``[tokens_i, dim]`` is
    ``embeddings[offsets[i]:offsets[i + 1]]`` (``offsets``: int64 ``[n + 1]``)."""

    embeddings: np.ndarray
    offsets: np.ndarray

    def matrix(self, i: int) -> np.ndarray:
        return self.embeddings[int(self.offsets[i]):int(self.offsets[i + 1])]


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkEmbedResult(EmbedResult):
    """Late chunking's answer: one vector per chunk of the one text, in chunk order, and each
    chunk's ``spans`` row: its ``[start, end)`` character offsets into the text (int64
    ``[chunks, 2]``)."""

    spans: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class MultiEmbedResult(Measured):
    """Several outputs of one forward pass (BGE-M3), ``parts`` in the order the request's
    ``outputs`` named them."""

    parts: tuple[EmbedResult | SparseEmbedResult | TokenEmbedResult, ...]


#: what an :class:`EmbedRequest` answers, by the model's task and the request's ``outputs``
AnyEmbedResult = EmbedResult | SparseEmbedResult | TokenEmbedResult | MultiEmbedResult


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassifyResult(Measured):
    """``scores``: float32 ``[n, labels]``, one row per input in request order, one column per
    label in the model's label order (:attr:`ModelInfo.labels`)."""

    scores: np.ndarray


@dataclass(frozen=True, slots=True, kw_only=True)
class RerankResult(Measured):
    """``scores``: float32 ``[n]``, one per document in request order."""

    scores: np.ndarray


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the protocols need to describe a loaded model. ``dim``: the width of its output
    (a vector's values, a classifier's labels, 1 for a reranker, a sparse model's vocabulary);
    ``hidden_size``: the width of its token vectors."""

    name: str
    version: str
    dim: int
    max_length: int
    vocab_size: int
    model_id: str
    pooling: str
    normalize: bool
    task: Task = "embedding"
    #: the model's prompts by name, and the one texts get when a request names none
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt: str | None = None
    #: int8/uint8 ranges, float32 ``[2, dim]`` (per-dimension low and high), fixed at warm-up
    #: on :attr:`calibration_texts` texts of the calibration corpus; None for rerankers, and
    #: for variants (they calibrate in a replica, on their first int8/uint8 request)
    int8_ranges: np.ndarray | None = None
    calibration_texts: int = 0
    #: a variant's base model (the entry that serves it); None for a model of its own
    variant_of: str | None = None
    #: the engine running the model and its fidelity to float32 torch
    #: (:meth:`serve_app.engine.embedding.TransformerEngine.engine_info`)
    engine: dict[str, Any] | None = None
    #: the checkpoint's revision as configured (None: its default branch)
    revision: str | None = None
    #: the model's output labels by index, from its config's ``id2label`` (a reranker's one)
    labels: tuple[str, ...] = ()
    #: a replica's limits: inputs and tokens per forward pass, inputs admitted at once
    max_batch_size: int = 0
    max_batch_tokens: int = 0
    max_queued_inputs: int = 0
    #: threads a replica tokenizes long requests on
    tokenizer_threads: int = 0
    hidden_size: int = 0
    #: a classifier's KServe V1/V2 answer (``ModelConfig.kserve_output``)
    kserve_output: str = "label"
    #: what an embedding request may ask of it (:data:`Output`), its own answer first
    outputs: tuple[str, ...] = ("pooled", "tokens")
    #: a multi-vector model's query length (its documents': ``max_length``)
    query_length: int = 0
    #: the width of its multi-vector rows (a multi-vector model's ``dim``; BGE-M3's heads')
    multivector_dim: int = 0

    def prompt_names(self) -> list[str]:
        return [n for n, _ in self.prompts]
