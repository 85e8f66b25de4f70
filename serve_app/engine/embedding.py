"""The embedding engine: transformers' tokenizers, a graph on one of the backends
(:mod:`.backends`: torch, ONNX Runtime, OpenVINO), pooling in torch. No Ray and no HTTP.

Steps are separate so batching can be arranged around them and each can be tested alone:
``tokenize`` (texts -> token ids), ``forward`` (token ids -> vectors: pad, run the graph, pool,
normalize), and the pure helper ``pool`` (passes are planned by :mod:`.batching`).
:class:`TransformerEngine` holds what the embedding engine and the reranker
(:mod:`serve_app.engine.reranker`) share, the fidelity check (:mod:`.fidelity`) included.
"""

from __future__ import annotations

import copy
import functools
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from serve_app.config.schema import ModelConfig
from serve_app.engine import fidelity as fid
from serve_app.engine.backends import (
    Backend,
    BackendName,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchBackend,
    choose,
    cpu_has_bf16,
)
from serve_app.engine.batching import plan_batches
from serve_app.engine.convert import files_digest, graph_for, int8_graph_for
from serve_app.engine.long_inputs import Frame, LateChunks, Windows, late_chunks
from serve_app.engine.model_files import read_settings, resolve_model_dir
from serve_app.engine.quantize import Calibration, calibration_texts
from serve_app.errors import InvalidInput, ModelLoadError, PayloadTooLarge
from serve_app.types import NO_PROMPT, Input, ModelInfo, Output, Side, Task, Token

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_HUGE = 1_000_000  # tokenizers say model_max_length=1e30 when they do not know


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but CUDA is not available")
    return torch.device(device)


def plan_parallelism(threads: int, device: torch.device,
                     parallel_passes: int | None = None) -> tuple[int, int]:
    """(forward passes at once, threads each) for a replica owning ``threads`` CPU threads.

    On CPU, small models scale poorly across intra-op threads, on every backend: two passes at
    once, each on half the threads, keep the cores busier than one pass on all of them (and a
    pass that is descheduled stalls only its own half). On GPU one pass at a time feeds the
    device."""
    passes = parallel_passes or (1 if device.type != "cpu" or threads < 2 else 2)
    return passes, max(1, threads // passes)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp16 keeps more mantissa than bf16, which matters for unit-length embeddings.
        return torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype == "float16":
        raise ModelLoadError("float16 is not supported on CPU; use float32 or bfloat16")
    if device.type == "cpu" and dtype == "bfloat16" and not cpu_has_bf16():
        log.warning("this CPU has no native bfloat16 (AVX512-BF16 or AMX): bfloat16 runs "
                    "emulated, slower than float32")
    return _DTYPES[dtype]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``hidden [b, L, d]`` over tokens where ``mask [b, L]`` is 1 (right padding; a
    prompt left out of pooling is 0 at the start).

    Matches sentence-transformers' ``Pooling`` for the modes it names. Returns ``[b, d]``.
    """
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if mode == "cls":  # the first token pooled (not always 0: a prompt may be left out)
        return hidden[rows, mask.argmax(dim=1)]
    if mode == "lasttoken":
        return hidden[rows, mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    counts = m.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / counts
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    raise ValueError(f"unknown pooling mode {mode!r}")


class PairIds(list[int]):
    """A (query, document) pair's token ids; the first ``first`` of them are the query's part
    (token type 0), the rest the document's (token type 1)."""

    __slots__ = ("first",)

    def __init__(self, ids: Sequence[int], first: int) -> None:
        super().__init__(ids)
        self.first = first


class PromptIds(list[int]):
    """A text's token ids whose first ``skip`` are its prompt's, left out of pooling (a model
    whose pooling says ``include_prompt: false``)."""

    __slots__ = ("skip",)

    def __init__(self, ids: Sequence[int], skip: int) -> None:
        super().__init__(ids)
        self.skip = skip


def _byte_offsets(text: str) -> Callable[[int], int]:
    """Maps a character offset into ``text`` to its UTF-8 byte offset."""
    if text.isascii():
        return int
    ends = np.cumsum([0, *(len(c.encode("utf-8")) for c in text)])
    return lambda i: int(ends[i])


class TransformerEngine:
    """What every served model shares: the files, the device, the backend running its graph
    (:mod:`.backends`), the tokenizer, the token limit, padded forward inputs, and the fidelity
    check. ``auto_class`` names the transformers class of the graph; ``task`` the outputs'
    kind, for :func:`serve_app.engine.fidelity.agreement`.

    ``num_threads``: the threads of one forward pass; ``passes``: how many run at once."""

    auto_class = "AutoModel"
    task: Task = "embedding"
    dim: int
    #: a classification head's label names by index (none for other models)
    labels: tuple[str, ...] = ()

    def __init__(self, cfg: ModelConfig, num_threads: int | None = None, passes: int = 1
                 ) -> None:
        import transformers

        t0 = time.perf_counter()
        self.cfg = cfg
        if num_threads:
            torch.set_num_threads(num_threads)
        log.info("resolving %s (revision %s)", cfg.model_id, cfg.model_revision or "default")
        self.model_dir = resolve_model_dir(cfg.model_id, cfg.model_revision)
        log.info("resolved %s to %s in %.2fs", cfg.model_id, self.model_dir,
                 time.perf_counter() - t0)
        self.settings = read_settings(self.model_dir)
        self.device = pick_device(cfg.device)
        backend, self.precision, dtype = choose(cfg.backend, cfg.precision, cfg.dtype,
                                                self.device)
        self.dtype = pick_dtype(dtype, self.device)
        log.info("loading %s from %s: %s %s on %s", cfg.model_id, self.model_dir, backend,
                 dtype, self.device)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(
                self.model_dir, trust_remote_code=cfg.trust_remote_code
            )
            self.model_config = transformers.AutoConfig.from_pretrained(
                self.model_dir, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load {cfg.model_id!r} from {self.model_dir}: {e}") from e
        threads = num_threads or torch.get_num_threads()
        self.backend: Backend = self._load(backend, dtype, passes, threads)

        model_limit = int(getattr(self.model_config, "max_position_embeddings", 0) or _HUGE)
        tok_limit = int(self.tokenizer.model_max_length or _HUGE)
        natural = self.settings.max_seq_length or min(tok_limit, model_limit)
        self.max_length = int(cfg.max_length or natural)
        if self.max_length > model_limit:
            raise ModelLoadError(
                f"max_length {self.max_length} exceeds the model's {model_limit} positions"
            )
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.uses_token_types = ("token_type_ids" in self.tokenizer.model_input_names
                                 and "token_type_ids" in self.backend.input_names)
        self.max_batch_tokens = cfg.batching.max_batch_tokens
        self.max_batch_size = cfg.batching.max_batch_size
        self.fidelity: fid.Fidelity | None = None
        self._rust: dict[tuple[bool, Side, int], Any] = {}  # see _rust_tokenizer
        self.t0 = t0

    @functools.cached_property
    def files_digest(self) -> str:
        """The model files' hash (:func:`serve_app.engine.convert.files_digest`), read once: it
        names both the cached conversion and the fidelity reference."""
        return files_digest(self.model_dir)

    def _torch_model(self, dtype: torch.dtype) -> TorchBackend:
        import transformers

        try:
            model = getattr(transformers, self.auto_class).from_pretrained(
                self.model_dir, dtype=dtype, trust_remote_code=self.cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load {self.cfg.model_id!r} from {self.model_dir}: {e}"
                                 ) from e
        return TorchBackend(model, self.device, dtype)

    def _load(self, name: BackendName, precision: str, passes: int, threads: int) -> Backend:
        if name == "torch":
            self.graph_source = "weights"
            return self._torch_model(self.dtype)
        trust = self.cfg.trust_remote_code
        if self.precision == "int8":
            path, source = int8_graph_for(self.model_dir, self.auto_class, self.files_digest,
                                          trust)
        else:
            path, source = graph_for(self.model_dir, name, self.auto_class, self.files_digest,
                                     trust)
        log.info("%s graph for %s: %s (%s)", name, self.cfg.model_id, path, source)
        self.graph_source = source
        try:
            if name == "onnxruntime":
                return OnnxRuntimeBackend(path, threads,
                                          "int8" if self.precision == "int8" else precision)
            return OpenVinoBackend(path, passes, threads * passes, precision)
        except Exception as e:  # each runtime raises its own types for a graph it cannot run
            raise ModelLoadError(f"{name} cannot run {path}: {type(e).__name__}: {e}") from e

    def loaded(self, what: str) -> None:
        self.load_seconds = time.perf_counter() - self.t0
        log.info("loaded %s in %.2fs: %s, %s max_length=%d", self.cfg.model_id,
                 self.load_seconds, self.backend.describe(), what, self.max_length)

    def feeds(self, seqs: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Right-padded int64 ``input_ids``, ``attention_mask`` (and ``token_type_ids``: 1 on
        the document part of a :class:`PairIds`), as numpy arrays."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        types = np.zeros((len(seqs), width), dtype=np.int64) if self.uses_token_types else None
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
            if types is not None and isinstance(s, PairIds):
                types[row, s.first : len(s)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            out["token_type_ids"] = types
        return out

    def tokenizer_for(self, side: Side) -> Any:
        """The tokenizer, truncating at ``side``: a copy made once for the left side, since
        transformers' tokenizers read the side from an attribute, not per call, and two
        threads tokenize at once."""
        if side == "right":
            return self.tokenizer
        left = getattr(self, "_left_tokenizer", None)
        if left is None:
            left = copy.deepcopy(self.tokenizer)
            left.truncation_side = "left"
            self._left_tokenizer = left
        return left

    def encode(self, texts: Sequence[str], truncate: bool = True, side: Side = "right"
               ) -> tuple[list[list[int]], int]:
        """Token ids per text, special tokens included, cut at ``max_length`` (at ``side``)
        when ``truncate``, and how many were cut.

        A fast tokenizer's own (Rust) tokenizer is called directly, configured once per
        truncation and side: transformers' call sets its truncation up and back on every call,
        which costs more than tokenizing a short text, and copies are safe to share between
        threads where the one transformers reconfigures is not. Same ids (tests hold it)."""
        rust = self._rust_tokenizer(truncate, side)
        if rust is None:  # a slow (Python) tokenizer
            enc = self.tokenizer_for(side)(
                list(texts), add_special_tokens=True, truncation=truncate,
                max_length=self.max_length if truncate else None,
                return_attention_mask=False, return_token_type_ids=False, verbose=False)
            ids: list[list[int]] = enc["input_ids"]
            return ids, sum(1 for seq in ids if truncate and len(seq) >= self.max_length)
        encodings = rust.encode_batch(list(texts), add_special_tokens=True)
        return [e.ids for e in encodings], sum(1 for e in encodings if e.overflowing)

    def _rust_tokenizer(self, truncate: bool, side: Side, length: int | None = None) -> Any:
        """The fast tokenizer's Rust tokenizer set up for (``truncate``, ``side``), cutting at
        ``length`` (default ``max_length``), made once; None for a slow tokenizer."""
        key = (truncate, side, length or self.max_length)
        found = self._rust.get(key)
        if found is None:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            if backend is None:
                return None
            found = copy.deepcopy(backend)
            if truncate:
                found.enable_truncation(key[2], direction=side)
            else:
                found.no_truncation()
            found.no_padding()
            self._rust[key] = found
        return found

    def tokens(self, texts: Sequence[str], add_special_tokens: bool = True
               ) -> list[tuple[Token, ...]]:
        """Each text's tokens, never truncated: ids, the characters each covers (the text
        itself, and its start and stop as UTF-8 byte offsets, as text-embeddings-inference
        reports them), and the special tokens by name."""
        enc = self.tokenizer(list(texts), add_special_tokens=add_special_tokens,
                             return_offsets_mapping=True, return_special_tokens_mask=True,
                             return_attention_mask=False, return_token_type_ids=False,
                             verbose=False)
        out = []
        for text, ids, offsets, special in zip(texts, enc["input_ids"], enc["offset_mapping"],
                                               enc["special_tokens_mask"], strict=True):
            names = self.tokenizer.convert_ids_to_tokens(ids)
            at = _byte_offsets(text)
            out.append(tuple(
                Token(int(i), name, True, None, None) if s else
                Token(int(i), text[a:b], False, at(a), at(b))
                for i, (a, b), s, name in zip(ids, offsets, special, names, strict=True)))
        return out

    def decode(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = True
               ) -> list[str]:
        """Each token-id sequence as text; ids outside the vocabulary are refused."""
        for i, seq in enumerate(seqs):
            bad = [t for t in seq if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidInput(f"ids {i} holds token id {bad[0]}, outside the vocabulary "
                                   f"[0, {self.vocab_size})", param="ids")
        return self.tokenizer.batch_decode([list(s) for s in seqs],
                                           skip_special_tokens=skip_special_tokens)

    def check_length(self, i: int, n: int, what: str = "input") -> None:
        if n > self.max_length:
            raise InvalidInput(
                f"{what} {i} has {n} tokens, more than the model's limit of {self.max_length}; "
                "shorten it or allow truncation", param="input")

    # -- outputs, and how far they are from float32 torch's ------------------------------------

    def run(self, backend: Backend, seqs: Sequence[Sequence[int]], threads: int | None = None
            ) -> np.ndarray:
        """One pass over exactly ``seqs`` on ``backend``: float32 ``[n, dim]``."""
        raise NotImplementedError

    def forward(self, seqs: Sequence[Sequence[int]], threads: int | None = None) -> np.ndarray:
        """One forward pass over exactly ``seqs`` (padded to the longest): float32 ``[n, dim]``,
        on ``threads`` threads (torch reads it per call; the other backends fixed theirs)."""
        return self.run(self.backend, seqs, threads)

    def serve_pass(self, seqs: Sequence[Sequence[int]], threads: int | None = None
                   ) -> np.ndarray:
        """What one pass of a serving replica's queue computes: :meth:`forward`, unless the
        engine leaves a per-request step to the runner (:meth:`EmbeddingEngine.serve_pass`)."""
        return self.forward(seqs, threads)

    def outputs(self, seqs: Sequence[Sequence[int]], backend: Backend | None = None
                ) -> np.ndarray:
        """Outputs for any number of token-id sequences, float32 ``[n, dim]``, in input order,
        in passes planned by :func:`plan_batches` (a served replica forms its passes in
        :mod:`serve_app.runtime.batch_queue` and calls :meth:`forward` instead)."""
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        lengths = [len(s) for s in seqs]
        for idx in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size):
            out[idx] = self.run(backend or self.backend, [seqs[i] for i in idx])
        return out

    def output_settings(self) -> str:
        """What besides the files and token ids shapes an output (the reference's cache key)."""
        return self.task

    def fidelity_inputs(self, n: int) -> list[list[int]]:
        """``n`` calibration inputs, as token ids."""
        raise NotImplementedError

    @property
    def is_reference(self) -> bool:
        return self.backend.name == "torch" and self.dtype == torch.float32

    @property
    def min_fidelity(self) -> float:
        if self.cfg.min_fidelity is not None:
            return self.cfg.min_fidelity
        return fid.MIN_FIDELITY[self.precision]

    def verify(self, seqs: Sequence[Sequence[int]] | None = None,
               outputs: np.ndarray | None = None, sample: int = 64) -> fid.Fidelity:
        """Measure how far this engine's outputs for ``seqs`` (default: ``sample`` calibration
        inputs; ``outputs``: already computed) are from float32 torch's, keep the figure in
        :attr:`fidelity`, and refuse (ModelLoadError) an engine below ``min_fidelity``."""
        if self.is_reference:  # float32 torch is the reference itself
            self.fidelity = fid.Fidelity(1.0, 1.0, len(seqs) if seqs else 0, measured=False)
            return self.fidelity
        seqs = list(seqs) if seqs is not None else self.fidelity_inputs(sample)
        if outputs is None:
            outputs = self.outputs(seqs)
        key = fid.reference_key(self.files_digest, self.output_settings(), seqs)
        reference = fid.reference_outputs(key, lambda: self._reference_outputs(seqs))
        measured = fid.measure(outputs, reference, self.task)
        fid.gate(measured, self.min_fidelity, self.cfg.name, self.backend.describe())
        self.fidelity = measured
        return measured

    def _reference_outputs(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        log.info("computing the float32 torch reference for %s (once; kept on disk)",
                 self.cfg.model_id)
        reference = self._torch_model(torch.float32)
        try:
            return self.outputs(seqs, reference)
        finally:
            del reference
            gc.collect()

    def described(self) -> dict[str, Any]:
        """The :class:`ModelInfo` fields every engine fills the same way."""
        return {"max_length": self.max_length, "vocab_size": self.vocab_size,
                "model_id": self.cfg.model_id, "engine": self.engine_info(),
                "revision": self.cfg.model_revision, "labels": self.labels,
                "hidden_size": int(getattr(self.model_config, "hidden_size", 0) or 0),
                "kserve_output": self.cfg.kserve_output,
                "max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "max_queued_inputs": self.cfg.max_queued_inputs}

    def engine_info(self) -> dict[str, Any]:
        """The engine and its measured fidelity, for model metadata and metrics."""
        f = self.fidelity
        return {"backend": self.backend.name, "precision": self.precision,
                "dtype": self.backend.precision, "device": str(self.device),
                "fidelity": None if f is None else {
                    "min": f.min, "mean": f.mean, "inputs": f.inputs,
                    "reference": fid.REFERENCE, "measured": f.measured},
                "min_fidelity": self.min_fidelity}


class EmbeddingEngine(TransformerEngine):
    """One loaded embedding model.

    ``embed_ids`` returns float32 ``[n, dim]`` numpy arrays in input order. Errors in caller input
    raise :class:`InvalidInput`; load problems raise :class:`ModelLoadError`. After
    :meth:`warmup`, ``calibration`` holds the int8/uint8 ranges of the calibration corpus.
    """

    #: whether the engine applies the directory's ``Dense`` projections (a multi-vector one)
    takes_dense = False
    #: what a request may ask of it (:data:`serve_app.types.Output`), its own answer first
    offers: tuple[Output, ...] = ("pooled", "tokens")
    #: the width of its multi-vector rows (none: 0)
    multivector_dim = 0

    def __init__(self, cfg: ModelConfig, num_threads: int | None = None, passes: int = 1
                 ) -> None:
        super().__init__(cfg, num_threads, passes)
        settings = self.settings
        if settings.dense and not self.takes_dense:
            kind = settings.st_config.get("model_type")
            raise ModelLoadError(
                f"{cfg.model_id!r} has Dense projections after its transformer, which a "
                f"task {cfg.task!r} model does not apply"
                + ("; it is a ColBERT model: serve it with task: multivector"
                   if kind == "ColBERT" else ""))
        self.pooling, self.normalize, self.dim = self._output_kind()
        self.lower_case = settings.do_lower_case
        self.include_prompt = settings.include_prompt
        self.prompts = dict(settings.prompts)
        self.default_prompt = settings.default_prompt_name
        if self.default_prompt is not None and self.default_prompt not in self.prompts:
            raise ModelLoadError(f"default_prompt_name {self.default_prompt!r} is not one of "
                                 f"the model's prompts {sorted(self.prompts)}")
        # measured once per prompt here, not per request (the tokenizer's own call is not
        # safe beside the tokenizing threads): models that leave prompts out of pooling, and
        # windows of long texts, need them
        self._prompt_lengths = {
            text: self._prompt_length(text) for text in self.prompts.values() if text}
        self.specials = self._specials()
        self.calibration: Calibration | None = None
        self.loaded(f"dim={self.dim} pooling={self.pooling} normalize={self.normalize}")

    def _output_kind(self) -> tuple[str, bool, int]:
        """(pooling, normalize, dim) from the config, else the model's files."""
        cfg, settings = self.cfg, self.settings
        pooling = cfg.pooling if cfg.pooling != "auto" else (settings.pooling or "mean")
        normalize = cfg.normalize if cfg.normalize is not None else (
            settings.normalize if settings.normalize is not None else True)
        return pooling, normalize, int(self.model_config.hidden_size)

    # -- steps ---------------------------------------------------------------------------------

    def prompt(self, name: str | None) -> str:
        """The text of prompt ``name`` (None: the model's default prompt, or none;
        ``NO_PROMPT``: none)."""
        if name is None:
            return self.prompts[self.default_prompt] if self.default_prompt else ""
        if name == NO_PROMPT:
            return ""
        try:
            return self.prompts[name]
        except KeyError:
            raise InvalidInput(
                f"model has no prompt {name!r}; its prompts: {sorted(self.prompts)}",
                param="prompt_name") from None

    def model_texts(self, texts: Sequence[str], prompt_name: str | None = None) -> list[str]:
        """The texts as the model reads them: the prompt before each (as sentence-transformers
        puts it), lower-cased for a model that says ``do_lower_case``."""
        prompt = self.prompt(prompt_name)
        out = [prompt + t for t in texts] if prompt else list(texts)
        return [t.lower() for t in out] if self.lower_case else out

    def tokenize(self, texts: Sequence[str], truncate: bool = True,
                 prompt_name: str | None = None, side: Side = "right", whole: bool = False
                 ) -> tuple[list[list[int]], int]:
        """Token ids per text (:meth:`model_texts`), special tokens included, cut at
        ``max_length`` when ``truncate`` (the end of the text, or with ``side`` "left" its
        start), and how many of the texts were cut. With ``truncate=False`` a text longer than
        the limit raises :class:`InvalidInput`, unless ``whole`` (to embed in windows)."""
        prompt = self.prompt(prompt_name)
        texts = self.model_texts(texts, prompt_name)
        ids, cut = self.encode(texts, truncate, side)
        if prompt and not self.include_prompt:
            skip = self._prompt_lengths[prompt]
            ids = [PromptIds(seq, skip) for seq in ids]
        if not truncate and not whole:
            for i, seq in enumerate(ids):
                self.check_length(i, len(seq))
        return ids, cut

    def _prompt_length(self, prompt: str) -> int:
        """The prompt's tokens at the start of a text's ids, as sentence-transformers counts them:
        the prompt tokenized alone, less a trailing special token."""
        ids = self.tokenizer(prompt.lower() if self.lower_case else prompt,
                             add_special_tokens=True)["input_ids"]
        return len(ids) - (1 if ids and ids[-1] in self.tokenizer.all_special_ids else 0)

    def check_token_ids(self, seqs: Sequence[Sequence[int]], whole: bool = False) -> None:
        """Refuse token-id inputs the model cannot take: empty, too long (with ``whole``, for
        embedding whole in windows: longer than ``max_document_tokens``), outside the
        vocabulary."""
        for i, seq in enumerate(seqs):
            if len(seq) == 0:
                raise InvalidInput(f"input {i} is an empty token list", param="input")
            if whole:
                self.check_document(i, len(seq))
            elif len(seq) > self.max_length:
                raise InvalidInput(
                    f"input {i} has {len(seq)} tokens, more than the model's limit of "
                    f"{self.max_length}",
                    param="input",
                )
            lo, hi = min(seq), max(seq)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise InvalidInput(
                    f"input {i} holds token id {bad}, outside the vocabulary [0, "
                    f"{self.vocab_size})",
                    param="input",
                )

    def check_document(self, i: int, n: int) -> None:
        """Refuse input ``i`` of ``n`` tokens when it is more than one text may have to be
        embedded whole (:class:`PayloadTooLarge`)."""
        if n > self.cfg.max_document_tokens:
            raise PayloadTooLarge(
                f"input {i} has {n} tokens, more than the {self.cfg.max_document_tokens} one "
                "text may have to be embedded whole (max_document_tokens)")

    def _specials(self) -> tuple[int, int]:
        """The special tokens the tokenizer puts before and after a text's own."""
        mask = self.tokenizer("a", add_special_tokens=True,
                              return_special_tokens_mask=True)["special_tokens_mask"]
        own = [i for i, m in enumerate(mask) if not m]
        return own[0], len(mask) - 1 - own[-1]

    def frame(self, prompt_name: str | None = None, ids: bool = False) -> Frame:
        """How a text's ids (with ``prompt_name``'s prompt), or with ``ids`` a caller's token
        ids, are framed, for windows of the model's limit (:mod:`.long_inputs`)."""
        lead, trail = self.specials
        prompt = "" if ids else self.prompt(prompt_name)
        head = self._prompt_lengths[prompt] if prompt else lead
        return Frame(head, trail, self.max_length, self.cfg.chunk_overlap)

    def prepare_windows(self, inputs: Sequence[Input], prompt_name: str | None = None
                        ) -> tuple[Windows, int]:
        """``inputs`` embedded whole (``long_inputs: chunk``): every input's windows of the
        model's limit, in order, with the plan that pools them back (none is cut)."""
        self.check_token_ids([x for x in inputs if not isinstance(x, str)], whole=True)
        texts = [x for x in inputs if isinstance(x, str)]
        ids = iter(self.tokenize(texts, False, prompt_name, whole=True)[0] if texts else [])
        text_frame, id_frame = self.frame(prompt_name), self.frame(ids=True)
        windows = []
        for i, x in enumerate(inputs):
            seq = next(ids) if isinstance(x, str) else list(x)
            self.check_document(i, len(seq))
            one = (text_frame if isinstance(x, str) else id_frame).windows(seq)
            if isinstance(seq, PromptIds):  # every window's prompt stays out of pooling
                one = [PromptIds(w, seq.skip) for w in one]
            windows.append(one)
        return Windows.of(windows, self.window_pooling), 0

    #: how a text's windows' vectors become its own (:class:`.long_inputs.Windowed`)
    window_pooling = "mean"

    def late_chunks(self, text: str, prompt_name: str | None,
                    chunks: Sequence[tuple[int, int]] | None, chunk_tokens: int | None
                    ) -> LateChunks:
        """Plan late chunking of ``text`` (:func:`.long_inputs.late_chunks`): tokenized with
        its character offsets, never cut."""
        rust = self._rust_tokenizer(False, "right")
        if rust is None:
            raise InvalidInput("late chunking needs the character offsets of a fast "
                               "tokenizer; this model's tokenizer is a slow one", param="chunks")
        prompt = self.prompt(prompt_name)
        shift = len(prompt.lower() if self.lower_case else prompt)
        enc = rust.encode(self.model_texts([text], prompt_name)[0], add_special_tokens=True)
        seq = list(enc.ids)
        self.check_document(0, len(seq))
        frame = self.frame(prompt_name)
        own = enc.offsets[frame.head: len(seq) - frame.tail]
        offsets = [(max(0, a - shift), max(0, b - shift)) for a, b in own]
        return late_chunks(seq, offsets, frame, chunks, chunk_tokens, len(text),
                           "max" if self.pooling == "max" else "mean")

    def embed_ids(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Vectors for any number of token-id sequences (:meth:`outputs`)."""
        return self.outputs(seqs)

    def run(self, backend: Backend, seqs: Sequence[Sequence[int]], threads: int | None = None,
            normalize: bool | None = None) -> np.ndarray:
        """One pass over exactly ``seqs``: pooled vectors, L2-normalized when ``normalize``
        (None: as the model's config says)."""
        feeds = self.feeds(seqs)
        with torch.inference_mode():
            hidden = backend.run(feeds, threads)
            mask = torch.from_numpy(feeds["attention_mask"]).to(hidden.device)
            if any(isinstance(s, PromptIds) for s in seqs):  # the prompt attends, not pools
                for row, s in enumerate(seqs):
                    if isinstance(s, PromptIds):
                        mask[row, : s.skip] = 0
            vectors = self.pool_pass(hidden, mask).cpu().numpy()
        # one normalizing for every path (served passes normalize per request): the same text
        # gives the same bits in process and served
        return self.finish(vectors, normalize)

    def pool_pass(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[b, dim]`` from a pass's outputs ``[b, L, ...]`` and ``mask`` ``[b, L]`` (0 for
        padding and prompt tokens); the outputs may be changed in place."""
        return pool(hidden, mask, self.pooling)

    def token_pass(self, seqs: Sequence[Sequence[int]], threads: int | None = None
                   ) -> list[np.ndarray]:
        """One pass of every token's vector (the last hidden state, special tokens and prompt
        included, before pooling): float32 ``[len(seq), hidden]`` per sequence."""
        with torch.inference_mode():
            hidden = self.backend.run(self.feeds(seqs), threads).cpu().numpy()
        return [np.array(hidden[row, : len(s)], dtype=np.float32) for row, s in enumerate(seqs)]

    def serve_pass(self, seqs: Sequence[Sequence[int]], threads: int | None = None
                   ) -> np.ndarray:
        """One pass of pooled vectors, not normalized: requests in one pass may differ on
        normalizing, so the runner does it per request (:meth:`finish`)."""
        return self.run(self.backend, seqs, threads, normalize=False)

    def finish(self, vectors: np.ndarray, normalize: bool | None = None) -> np.ndarray:
        """Pooled vectors from :meth:`serve_pass`, L2-normalized when ``normalize`` (None: as
        the model's config says), as torch's ``normalize`` does it."""
        if not (self.normalize if normalize is None else normalize):
            return vectors
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.maximum(norms, 1e-12, out=norms)
        return vectors / norms

    def output_settings(self) -> str:
        return f"embedding pooling={self.pooling} normalize={self.normalize}"

    def fidelity_inputs(self, n: int) -> list[list[int]]:
        return self.prepare(calibration_texts(self.cfg.calibration_corpus)[:n])[0]

    # -- whole requests ------------------------------------------------------------------------

    def prepare(self, inputs: Sequence[Input], truncate: bool = True,
                prompt_name: str | None = None, side: Side = "right"
                ) -> tuple[list[list[int]], int]:
        """Token ids for mixed text / token-id inputs, in order, and how many texts were cut
        (at ``side``); ``prompt_name`` goes before the texts (token ids are used as they
        are)."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        token_inputs = [x for x in inputs if not isinstance(x, str)]
        self.check_token_ids(token_inputs)
        seqs: list[list[int]] = [list(x) if not isinstance(x, str) else [] for x in inputs]
        truncated = 0
        if texts:
            ids, truncated = self.tokenize([t for _, t in texts], truncate, prompt_name, side)
            for (i, _), one in zip(texts, ids, strict=True):
                seqs[i] = one
        return seqs, truncated

    def embed(self, inputs: Sequence[Input], truncate: bool = True,
              prompt_name: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``[n, dim]`` float32 and token counts ``[n]`` int64 for ``inputs``."""
        seqs, _ = self.prepare(inputs, truncate, prompt_name)
        return self.embed_ids(seqs), np.fromiter((len(s) for s in seqs), np.int64, len(seqs))

    def warmup(self, threads: int | None = None) -> float:
        """Run short and full-length batches once so the first request pays no set-up cost,
        and :meth:`calibrate` (measuring the engine's fidelity). ``threads``: torch threads for
        this, on the calling thread (a replica's whole share: nothing else runs yet)."""
        t0 = time.perf_counter()
        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            self.embed(["warm up"] * min(8, self.max_batch_size))
            self.embed_ids([[self.pad_id] * self.max_length])
            self.calibrate(verify=True)
        finally:
            torch.set_num_threads(before)
        return time.perf_counter() - t0

    def calibrate(self, verify: bool = False) -> None:
        """Fix the int8/uint8 ranges on the calibration corpus, embedded as a request naming no
        prompt is (``SentenceTransformer.encode(corpus)``), on the calling thread's threads;
        with ``verify``, measure the engine's fidelity on the same vectors (:meth:`verify`)."""
        seqs, _ = self.prepare(calibration_texts(self.cfg.calibration_corpus))
        vectors = self.embed_ids(seqs)
        self.calibration = Calibration(vectors)
        if verify:
            self.verify(seqs, vectors)

    def info(self, name: str, version: str) -> ModelInfo:
        return ModelInfo(
            name=name, version=version, dim=self.dim, pooling=self.pooling,
            normalize=self.normalize, prompts=tuple(self.prompts.items()),
            default_prompt=self.default_prompt, task=self.task, outputs=self.offers,
            multivector_dim=self.multivector_dim,
            int8_ranges=None if self.calibration is None else self.calibration.full,
            calibration_texts=0 if self.calibration is None else self.calibration.texts,
            **self.described(),
        )
