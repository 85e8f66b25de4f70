"""Shared fixtures: the real default model, tiny models built on the spot, and an in-process app."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.model_files import resolve_model_dir

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
_POOLING_FLAG = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "lasttoken": "pooling_mode_lasttoken",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=int, default=0,
                     help="run the soak test (tests/test_robustness.py) for this many seconds")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine(ModelConfig(), num_threads=2)


TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random BERT (MiniLM's tokenizer) as a sentence-transformers directory.

    ``pooling=None`` writes no sentence-transformers files at all (a plain HF model).
    ``include_prompt`` writes the pooling config as sentence-transformers 6 does, with it.
    """
    import torch
    from transformers import BertConfig, BertModel

    made: dict[tuple, Path] = {}

    def build(
        pooling: str | None = "mean",
        normalize: bool = True,
        max_seq_length: int | None = 64,
        prompt: str | None = None,
        max_position_embeddings: int = 128,
        include_prompt: bool | None = None,
    ) -> Path:
        key = (pooling, normalize, max_seq_length, prompt, max_position_embeddings,
               include_prompt)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp(f"tiny-{pooling}")
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=max_position_embeddings,
        )
        BertModel(cfg).eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        if pooling is not None:
            st = "sentence_transformers.models."
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            ]
            if normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": st + "Normalize"})
                (d / "2_Normalize").mkdir()
            (d / "modules.json").write_text(json.dumps(modules))
            (d / "1_Pooling").mkdir()
            pcfg = {"word_embedding_dimension": 32, **{v: False for v in _POOLING_FLAG.values()}}
            pcfg[_POOLING_FLAG[pooling]] = True
            if include_prompt is not None:  # as sentence-transformers 6 writes it
                mode = "mean_sqrt_len_tokens" if pooling == "mean_sqrt_len" else pooling
                pcfg = {"embedding_dimension": 32, "pooling_mode": mode,
                        "include_prompt": include_prompt}
            (d / "1_Pooling" / "config.json").write_text(json.dumps(pcfg))
            if max_seq_length is not None:
                (d / "sentence_bert_config.json").write_text(
                    json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
                )
            if prompt is not None:
                (d / "config_sentence_transformers.json").write_text(
                    json.dumps({"prompts": {"query": prompt}, "default_prompt_name": "query"})
                )
        made[key] = d
        return d

    return build


@pytest.fixture(scope="session")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random one-label cross-encoder (BERT, MiniLM's tokenizer).

    ``saved_by``: "transformers" writes a plain sequence-classification directory (the default
    sigmoid applies); "sentence-transformers" saves it through ``CrossEncoder`` with
    ``activation`` (a torch.nn class name) in its config. ``labels``: other label counts make
    models serve_app must refuse."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    made: dict[tuple, Path] = {}

    def build(saved_by: str = "transformers", activation: str = "Identity",
              max_position_embeddings: int = 128, labels: int = 1) -> Path:
        key = (saved_by, activation, max_position_embeddings, labels)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp("cross-encoder")
        torch.manual_seed(1)
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=max_position_embeddings,
            num_labels=labels, initializer_range=0.5,  # wide weights: scores that differ
        )
        BertForSequenceClassification(cfg).eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        if saved_by == "sentence-transformers":
            from sentence_transformers import CrossEncoder

            act = getattr(torch.nn, activation)()
            out = tmp_path_factory.mktemp("cross-encoder-st")
            CrossEncoder(str(d), activation_fn=act).save_pretrained(str(out))
            d = out
        made[key] = d
        return d

    return build


@pytest.fixture(scope="session")
def prompted_minilm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """all-MiniLM-L6-v2 with the prompts of an asymmetric model (as E5 names them), no default:
    its files linked, its config_sentence_transformers.json rewritten."""
    d = tmp_path_factory.mktemp("minilm-prompts")
    for f in minilm_dir.iterdir():
        if f.name != "config_sentence_transformers.json":
            (d / f.name).symlink_to(f)
    (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: ", "plain": ""},
         "default_prompt_name": None}))
    return d
