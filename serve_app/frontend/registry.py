"""The served models, as the ingress knows them: one :class:`ServedModel` per (name, version),
built once from the config by :func:`build_registry`, a pure function of the config and of how
the Serve layer reaches a model (its ``backend`` factories). A request finds its model with one
:meth:`Registry.get`.

No Ray, no HTTP: the backends are :class:`ModelBackend` objects (a model runner in process, or
a deployment handle the Serve layer wraps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_app.config.schema import AppConfig, ModelConfig
from serve_app.errors import InvalidInput, ModelNotFound
from serve_app.types import (
    AnyEmbedResult,
    ClassifyRequest,
    ClassifyResult,
    DecodeRequest,
    DecodeResult,
    EmbedRequest,
    ModelInfo,
    RerankRequest,
    RerankResult,
    Task,
    TokenizeRequest,
    TokenizeResult,
)


class ModelBackend(Protocol):
    """One model seen from the ingress: a model runner in process (colocated), or a model
    deployment (or one of its variants) behind a Serve handle."""

    async def embed(self, req: EmbedRequest) -> AnyEmbedResult: ...

    async def rerank(self, req: RerankRequest) -> RerankResult: ...

    async def classify(self, req: ClassifyRequest) -> ClassifyResult: ...

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResult: ...

    async def decode(self, req: DecodeRequest) -> DecodeResult: ...

    async def info(self) -> ModelInfo: ...

    async def stats(self) -> dict[str, Any]: ...

    async def ready(self) -> bool:
        """Whether the model can take requests now (in Serve: it has a running replica)."""
        ...

    def queued_inputs(self) -> int:
        """Inputs admitted and not answered yet (the queue depth metric)."""
        ...

    def full(self) -> bool:
        """Whether the model's admission bound is reached now, as far as the ingress knows
        (it refuses requests before reading them while every served model is full)."""
        ...


@dataclass(eq=False)
class ServedModel:
    """One served (name, version): what answers it (``backend``), what it does (``task``), and
    its metadata once it has answered (``info``, cached by the data plane). ``variant_of``: the
    base model's name, for a fine-tuned variant served by its base's deployment."""

    name: str
    version: str
    task: Task
    backend: ModelBackend
    variant_of: str | None = None
    info: ModelInfo | None = field(default=None, repr=False)


class Registry:
    """The served models by name and version. Each name has one default version (what a request
    that names no version gets; the first one given for that name), listed first."""

    def __init__(self, models: Iterable[ServedModel]) -> None:
        self._by_name: dict[str, dict[str, ServedModel]] = {}
        for m in models:
            versions = self._by_name.setdefault(m.name, {})
            if m.version in versions:
                raise ValueError(f"model {m.name!r} version {m.version!r} is given twice")
            versions[m.version] = m

    @classmethod
    def of(cls, backends: Mapping[str, ModelBackend], *,
           versions: Mapping[str, str] | None = None,
           others: Mapping[tuple[str, str], ModelBackend] | None = None,
           tasks: Mapping[str, Task] | None = None) -> Registry:
        """A registry from plain mappings (tests, notebooks): ``backends`` the default version
        of each name (``versions`` its number, default "1"), ``others`` more versions, ``tasks``
        the names that are not embedding models."""
        versions, tasks = versions or {}, tasks or {}
        models = [ServedModel(n, versions.get(n, "1"), tasks.get(n, "embedding"), b)
                  for n, b in backends.items()]
        models += [ServedModel(n, v, tasks.get(n, "embedding"), b)
                   for (n, v), b in (others or {}).items()]
        return cls(models)

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def __iter__(self) -> Any:
        """Every served model, each name's default version first."""
        return (m for versions in self._by_name.values() for m in versions.values())

    def get(self, name: str, version: str | None = None) -> ServedModel:
        """The model ``name`` at ``version`` (None: its default); :class:`ModelNotFound` names
        what is served instead."""
        versions = self._by_name.get(name)
        if versions is None:
            raise ModelNotFound(
                f"model {name!r} is not served here; served models: {self.names}", param="model")
        if version is None:
            return next(iter(versions.values()))
        try:
            return versions[version]
        except KeyError:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: "
                                f"{list(versions)}", param="model") from None

    def versions(self, name: str) -> list[str]:
        """Every served version of ``name``, the default first."""
        self.get(name)
        return list(self._by_name[name])

    def of_task(self, task: Task) -> list[str]:
        """The served names that do ``task``."""
        return [n for n in self.names if self.get(n).task == task]

    def reranker(self, name: str | None) -> str:
        """The reranker a request names, or the only one served when it names none."""
        return self._only(name, "rerank", "reranker")

    def classifier(self, name: str | None) -> str:
        """The classifier a request names, or the only one served when it names none."""
        return self._only(name, "classify", "classifier")

    def _only(self, name: str | None, task: Task, word: str) -> str:
        if name is not None:
            return name
        found = self.of_task(task)
        if len(found) != 1:
            raise InvalidInput(
                f"no {word} is served here" if not found else
                f"several {word}s are served ({found}): name one in 'model'", param="model")
        return found[0]


#: How the Serve layer reaches a model entry, and a variant of it (its name, its checkpoint, the
#: entry's own backend).
BackendOf = Callable[[ModelConfig], ModelBackend]
VariantBackendOf = Callable[[ModelConfig, str, str, ModelBackend], ModelBackend]


def build_registry(cfg: AppConfig, backend_of: BackendOf,
                   variant_backend_of: VariantBackendOf | None = None) -> Registry:
    """The registry ``cfg`` serves: every entry under its name and version (each name's
    default version first: the one marked ``default``, else the first listed), then each
    entry's variants under their own names, at the entry's version and task."""
    defaults = {m.name: m for m in cfg.defaults()}
    ordered = sorted(cfg.models, key=lambda m: (list(defaults).index(m.name),
                                                defaults[m.name] is not m))
    models: list[ServedModel] = []
    variants: list[ServedModel] = []
    for m in ordered:
        backend = backend_of(m)
        models.append(ServedModel(m.name, m.version, m.task, backend))
        if m.variants is None:
            continue
        if variant_backend_of is None:
            raise ValueError(f"model {m.name!r} has variants, which need a deployment of its own")
        variants += [ServedModel(name, m.version, m.task,
                                 variant_backend_of(m, name, source, backend), variant_of=m.name)
                     for name, source in m.variants.sources.items()]
    return Registry(models + variants)
