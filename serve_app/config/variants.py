"""The configuration of a model's variants: fine-tuned checkpoints of one base, each served
under its own name and loaded into a replica on first use (:mod:`serve_app.runtime.variants` holds
them there).

Part of the one config tree (``ModelConfig.variants``); only pydantic here, so the config loads
without torch. The variants' names are resolved once, when the config is validated (a
directory is listed then), and travel with the config to every replica.
"""

from __future__ import annotations

import os
import re

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

#: Model names and versions: what a URL path segment and a Serve deployment name can hold.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"


class VariantSource(BaseModel):
    """One variant named explicitly: the name clients use, and its hub id or path."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name clients use, as for any model.")
    model_id: str = Field(description="Hub id or local directory of the checkpoint.")


class VariantOptions(BaseModel):
    """Variants of the entry's base model (``model_id``): checkpoints fine-tuned from it, served
    by the entry's deployment beside the base. Each is loaded into a replica by the first
    request that names it and kept while it is among the ``max_loaded`` most recently used
    there; Serve routes a request to a replica that holds its variant (model multiplexing).
    A variant must keep the base's width, token limit, pooling, normalization, tokenizer and
    prompts: the server describes it from the base before it is ever loaded, and refuses to
    load one that differs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    directory: str | None = Field(
        None, description="A directory of checkpoints: each sub-directory holding a config.json "
        "is a variant served under the sub-directory's name (listed when the config is "
        "validated; redeploy to pick up new ones)."
    )
    models: list[str | VariantSource] = Field(
        default_factory=list, description="Variants by hub id or path, each served under the "
        "last part of it (org/support-v2 as support-v2), or as {name, model_id}."
    )
    max_loaded: int = Field(
        4, ge=1, description="Variants one replica holds at once; loading another unloads the "
        "least recently used (the base stays)."
    )
    load_timeout_s: float = Field(
        30.0, gt=0, description="Longest a request waits for its variant to load; past it the "
        "answer is 503 with Retry-After while the load goes on."
    )
    reroute_s: float = Field(
        2.0, ge=0, description="How long the ingress keeps sending a variant's request back to "
        "the replicas it heard hold that variant before any replica may load it: Serve's router "
        "learns of a load only within its multiplexed matching window "
        "(RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S), and a request routed elsewhere "
        "meanwhile would load a second copy. 0: any replica at once."
    )
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve(self) -> VariantOptions:
        found: list[tuple[str, str]] = []
        if self.directory is not None:
            if not os.path.isdir(self.directory):
                raise ValueError(f"variants.directory {self.directory!r} is not a directory")
            found += sorted(
                (entry.name, entry.path) for entry in os.scandir(self.directory)
                if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "config.json")))
        for m in self.models:
            if isinstance(m, VariantSource):
                found.append((m.name, m.model_id))
            else:
                found.append((os.path.basename(m.rstrip("/")), m))
        if not found:
            raise ValueError("variants names no checkpoint (a directory of sub-directories "
                             "with a config.json, or models)")
        names = [n for n, _ in found]
        bad = sorted({n for n in names if not NAME_RE.match(n)})
        if bad:
            raise ValueError(f"variant names must be {NAME_RULE}: {bad}")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"variant names must be unique; repeated: {repeated}")
        self._sources = dict(found)
        return self

    @property
    def sources(self) -> dict[str, str]:
        """Each variant's name and its hub id or path, in a stable order."""
        return dict(self._sources)
