"""Texts longer than the model's limit, in process: ``long_inputs`` (truncate, chunk, error) and
late chunking, against references computed here from the model's own token outputs
(transformers' ``AutoModel``) and sentence-transformers' ``encode``."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.long_inputs import Frame
from serve_app.engine.sparse import SparseEngine
from serve_app.errors import InvalidInput, PayloadTooLarge
from serve_app.runtime.runner import ModelRunner
from serve_app.types import ChunkEmbedResult, EmbedRequest, EmbedResult, late_chunking, long_inputs

LIMIT, OVERLAP = 32, 6
DOC = " ".join(f"Sentence {i} is about topic {i % 7}, and its cats sleep." for i in range(14))


@pytest.fixture(scope="module")
def small(minilm_dir) -> EmbeddingEngine:
    """The default model with a limit of 32 tokens and windows that overlap by 6."""
    return EmbeddingEngine(ModelConfig(max_length=LIMIT, chunk_overlap=OVERLAP,
                                       max_document_tokens=400), num_threads=2)


@pytest.fixture(scope="module")
def hf(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir)), AutoModel.from_pretrained(
        str(minilm_dir)).eval()


def states(hf, ids: list[int]) -> np.ndarray:
    """The model's last hidden states for one sequence of token ids, ``[len(ids), 384]``."""
    with torch.no_grad():
        return hf[1](input_ids=torch.tensor([ids]),
                     attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                     ).last_hidden_state[0].numpy()


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def embed(engine: EmbeddingEngine, **kw) -> EmbedResult:
    return asyncio.run(ModelRunner(engine, "m").embed(EmbedRequest(model="m", **kw)))


# -- windows -----------------------------------------------------------------------------------

@given(n=st.integers(1, 400), head=st.integers(1, 5), tail=st.integers(0, 2),
       limit=st.integers(12, 64), overlap=st.integers(0, 6))
def test_windows_cover_every_token_within_the_limit(n, head, tail, limit, overlap):
    frame = Frame(head, tail, limit, overlap)
    seq = [-1] * head + list(range(n)) + [-2] * tail
    if len(seq) > limit and frame.room <= overlap:  # windows could not advance: refused
        with pytest.raises(InvalidInput, match="not more than the overlap"):
            frame.windows(seq)
        return
    windows = frame.windows(seq)
    if len(seq) <= limit:
        assert windows == [seq]
        return
    seen: list[int] = []
    for w in windows:
        assert len(w) <= limit and w[:head] == seq[:head]
        assert w[len(w) - tail:] == seq[len(seq) - tail:]
        own = w[head:len(w) - tail]
        if seen:  # each window shares exactly `overlap` tokens with the one before
            assert own[:overlap] == seen[-overlap:] if overlap else True
            own = own[overlap:]
        seen += own
    assert seen == list(range(n))


def test_a_frame_that_cannot_advance_is_refused():
    with pytest.raises(InvalidInput, match="not more than the overlap"):
        Frame(20, 1, 32, 11).windows(list(range(100)))


# -- long_inputs -------------------------------------------------------------------------------

def test_chunk_is_the_token_weighted_mean_of_every_window(small, hf):
    tok = hf[0]
    ids = tok(DOC)["input_ids"]
    assert len(ids) > 3 * LIMIT
    # the reference: windows of 32 tokens, [CLS] + 30 of the text's own + [SEP], 6 shared
    body, room = ids[1:-1], LIMIT - 2
    starts = list(range(0, len(body) - OVERLAP, room - OVERLAP))
    windows = [[ids[0], *body[a:a + room], ids[-1]] for a in starts]
    assert windows[-1][-2] == body[-1] and all(len(w) <= LIMIT for w in windows)
    pooled = np.stack([states(hf, w).mean(axis=0) for w in windows])
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    want = unit((pooled * weights[:, None]).sum(axis=0) / weights.sum())
    got = embed(small, inputs=(DOC, "a short text"), long_inputs="chunk")
    np.testing.assert_allclose(got.embeddings[0], want, atol=2e-6)
    # usage counts every window's tokens; a text within the limit is one window, as encoded
    assert got.token_counts.tolist() == [int(weights.sum()), 5] and got.truncated == 0
    short = embed(small, inputs=("a short text",))
    np.testing.assert_allclose(got.embeddings[1], short.embeddings[0], atol=1e-6)
    # token ids are windowed as they are
    by_ids = embed(small, inputs=(tuple(ids),), long_inputs="chunk")
    np.testing.assert_allclose(by_ids.embeddings[0], want, atol=2e-6)


def test_truncate_is_sentence_transformers_and_error_refuses(small, minilm_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model.max_seq_length = LIMIT
    got = embed(small, inputs=(DOC, "short"))  # the model's default: truncate
    np.testing.assert_allclose(got.embeddings, model.encode([DOC, "short"]), atol=2e-6)
    assert got.truncated == 1 and got.token_counts.tolist() == [LIMIT, 3]
    with pytest.raises(InvalidInput, match="more than the model's limit of 32"):
        embed(small, inputs=(DOC,), long_inputs="error")
    assert embed(small, inputs=("short",), long_inputs="error").truncated == 0


def test_a_models_default_long_inputs_and_the_document_limit(minilm_dir):
    engine = EmbeddingEngine(ModelConfig(max_length=LIMIT, long_inputs="chunk",
                                         max_document_tokens=100), num_threads=2)
    assert embed(engine, inputs=(DOC[:300],)).token_counts[0] > LIMIT  # windows, uncut
    assert embed(engine, inputs=(DOC[:300],), long_inputs="truncate").truncated == 1
    with pytest.raises(PayloadTooLarge, match="max_document_tokens"):
        embed(engine, inputs=(DOC,))
    with pytest.raises(PayloadTooLarge, match="max_document_tokens"):
        embed(engine, inputs=(tuple(range(1000, 1200)),))
    with pytest.raises(PayloadTooLarge, match="max_document_tokens"):
        embed(engine, inputs=(DOC,), chunk_tokens=8)


def test_chunk_keeps_a_prompt_in_every_window(prompted_minilm, hf):
    engine = EmbeddingEngine(ModelConfig(model_id=str(prompted_minilm), max_length=LIMIT),
                             num_threads=2)
    tok = hf[0]
    prompt = tok("query: ", add_special_tokens=False)["input_ids"]
    ids = tok("query: " + DOC)["input_ids"]
    body, room = ids[1 + len(prompt):-1], LIMIT - 2 - len(prompt)
    windows = [[ids[0], *prompt, *body[a:a + room], ids[-1]]
               for a in range(0, len(body), room)]
    pooled = np.stack([states(hf, w).mean(axis=0) for w in windows])
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    want = unit((pooled * weights[:, None]).sum(axis=0) / weights.sum())
    got = embed(engine, inputs=(DOC,), long_inputs="chunk", prompt_name="query")
    np.testing.assert_allclose(got.embeddings[0], want, atol=2e-6)


def test_wire_values():
    assert long_inputs(None) is None and long_inputs(None, False) == "error"
    assert long_inputs("chunk", False) == "chunk" and long_inputs(None, True) == "truncate"
    for bad in ("cut", 1, ""):
        with pytest.raises(InvalidInput, match="long_inputs must be one of"):
            long_inputs(bad)
    assert late_chunking([[0, 3], (4, 9)], None) == (((0, 3), (4, 9)), None)
    assert late_chunking(None, 5) == (None, 5)
    for chunks, tokens in (([[0, 3]], 4), ([], None), ([[0]], None), ([[0, "a"]], None),
                           (None, 0), (None, True), ("0-3", None)):
        with pytest.raises(InvalidInput):
            late_chunking(chunks, tokens)


# -- late chunking -----------------------------------------------------------------------------

def late_reference(hf, text: str, spans, max_length: int = 256, overlap: int = 0,
                   prompt: str = "") -> np.ndarray:
    """Each span's vector from the model's token outputs: the mean of the outputs of the
    tokens whose first character is in the span, from one pass over the whole text (or, past
    ``max_length``, from the window where the token lies deepest), normalized."""
    tok = hf[0]
    enc = tok(prompt + text, return_offsets_mapping=True, return_special_tokens_mask=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    head = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"]) if prompt else 1
    own = list(range(head, len(ids) - 1))
    if len(ids) <= max_length:
        out = states(hf, ids)
        rows = {t: out[t] for t in own}
    else:
        room, rows = max_length - head - 1, {}
        body = ids[head:-1]
        starts = [0]
        while starts[-1] + room < len(body):
            starts.append(starts[-1] + room - overlap)
        for w, a in enumerate(starts):
            out = states(hf, [*ids[:head], *body[a:a + room], ids[-1]])
            lo = a + (overlap // 2 if w else 0)
            hi = starts[w + 1] + overlap // 2 if w + 1 < len(starts) else len(body)
            for j in range(lo, hi):
                rows[head + j] = out[head + j - a]
    first = {t: offsets[t][0] - len(prompt) for t in own}
    return unit(np.stack([np.mean([rows[t] for t in own if a <= first[t] < b], axis=0)
                          for a, b in spans]))


def test_late_chunks_pool_their_own_tokens_of_one_pass(engine, hf):
    spans = ((0, 55), (56, 140), (141, 300))
    got = embed(engine, inputs=(DOC[:300],), chunks=spans)
    assert isinstance(got, ChunkEmbedResult) and got.spans.tolist() == [list(s) for s in spans]
    np.testing.assert_allclose(got.embeddings, late_reference(hf, DOC[:300], spans), atol=2e-6)
    # one pass, counted once; differs from embedding each chunk alone (its context counts)
    assert got.token_counts.tolist() == [len(hf[0](DOC[:300])["input_ids"])]
    alone = embed(engine, inputs=tuple(DOC[a:b] for a, b in spans))
    assert (np.sum(alone.embeddings * got.embeddings, axis=1) < 0.99).all()


def test_late_chunks_of_a_long_text_come_from_overlapping_windows(small, hf):
    got = embed(small, inputs=(DOC,), chunk_tokens=10)
    n = len(hf[0](DOC)["input_ids"]) - 2
    assert len(got.embeddings) == -(-n // 10)
    want = late_reference(hf, DOC, got.spans.tolist(), max_length=LIMIT, overlap=OVERLAP)
    np.testing.assert_allclose(got.embeddings, want, atol=2e-6)
    # the spans are the tokens' characters, in order, covering the text's words
    assert got.spans[0, 0] == 0 and got.spans[-1, 1] == len(DOC)
    assert (np.diff(got.spans[:, 0]) > 0).all()


def test_late_chunks_leave_the_prompt_out_and_refuse_what_they_cannot_answer(
        prompted_minilm, hf, splade):
    engine = EmbeddingEngine(ModelConfig(model_id=str(prompted_minilm)), num_threads=2)
    text, spans = DOC[:200], ((0, 60), (60, 200))
    got = embed(engine, inputs=(text,), chunks=spans, prompt_name="query")
    np.testing.assert_allclose(got.embeddings, late_reference(hf, text, spans,
                                                              prompt="query: "), atol=2e-6)
    for kw, match in (({"chunks": ((0, 500),)}, "not a non-empty span"),
                      ({"chunks": ((5, 5),)}, "not a non-empty span"),
                      ({"chunks": ((3, 4),)}, "holds no token"),
                      ({"chunks": ((0, 5),), "inputs": (text, text)}, "one text"),
                      ({"chunk_tokens": 4, "outputs": ("tokens",)}, "pooled output")):
        with pytest.raises(InvalidInput, match=match):
            embed(engine, **{"inputs": (text,), **kw})
    with pytest.raises(InvalidInput, match="dense embedding model"):
        embed(SparseEngine(ModelConfig(model_id=str(splade()), task="sparse"), num_threads=2),
              inputs=(text,), chunk_tokens=4)


def test_chunk_leaves_a_prompt_out_of_pooling_where_the_model_does(tiny_model):
    """A model whose pooling leaves its prompt out (include_prompt false) pools no prompt
    token of any window, a text within the limit included."""
    engine = EmbeddingEngine(ModelConfig(model_id=str(tiny_model(
        prompt="query: ", include_prompt=False)), max_length=24), num_threads=1)
    short, long = "a short text", " ".join(["words of a longer text"] * 12)
    for text in (short, long):
        whole = embed(engine, inputs=(text,), long_inputs="chunk")
        if text is short:  # one window: what truncate gives
            np.testing.assert_allclose(whole.embeddings, embed(engine, inputs=(text,)).embeddings,
                                       atol=1e-6)
    seqs, _ = engine.prepare_windows((short, long), "query")
    assert len(seqs) > 2 and all(getattr(s, "skip", 0) == engine._prompt_lengths["query: "]
                                 for s in seqs)


def test_a_splade_models_windows_pool_as_its_tokens_do(splade):
    """SPLADE max-pools over tokens: a long text's vector is the maximum over its windows,
    each window's vector SparseEncoder's own (tests/test_tasks.py holds that)."""
    engine = SparseEngine(ModelConfig(model_id=str(splade()), task="sparse", max_length=32,
                                      chunk_overlap=4), num_threads=1)
    whole = embed(engine, inputs=(DOC,), long_inputs="chunk")
    seqs, _ = engine.prepare_windows((DOC,))
    assert len(seqs) > 3 and whole.token_counts[0] == sum(map(len, seqs))
    want = engine.embed_ids(seqs).max(axis=0)
    got = np.zeros_like(want)
    got[whole.indices] = whole.values
    np.testing.assert_allclose(got, want, atol=1e-6)
