"""A model's variants in one replica, without Ray: building each from its checkpoint beside the
base, checking it against the base, bounding a request's wait for a load, and counting loads,
evictions and what is resident.

Which variants a replica keeps is Serve's model multiplexing (:mod:`serve_app.serve.deployments`
wires :meth:`VariantHost.load` through ``@serve.multiplexed``): it keeps the ``max_loaded`` most
recently used, loads each once however many requests ask for it at once, tells Serve's router
which replica holds which, and calls :meth:`Variant.__del__` on the one it evicts. An evicted
variant's requests already queued still finish: they hold its model until they do.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serve_app.config.schema import ModelConfig
from serve_app.errors import Misrouted, ModelNotFound, ModelNotReady
from serve_app.runtime.runner import ModelRunner
from serve_app.types import ModelInfo, VariantReport

log = logging.getLogger(__name__)

#: What a variant shares with its base: what the server says of it before it is ever loaded.
INHERITED = ("task", "dim", "max_length", "vocab_size", "pooling", "normalize", "prompts",
          "default_prompt")


def describe(base: ModelInfo, name: str, source: str) -> ModelInfo:
    """Variant ``name``'s metadata, from its base's: only its int8 ranges are unknown until a
    replica loads it and calibrates it on its first int8/uint8 request."""
    return dataclasses.replace(base, name=name, model_id=source, int8_ranges=None,
                               calibration_texts=0, variant_of=base.name)


def differences(base: ModelInfo, variant: ModelInfo) -> list[str]:
    """How ``variant`` departs from its ``base`` in what they must share (:data:`INHERITED`)."""
    return [f"{f} {getattr(variant, f)!r} where the base has {getattr(base, f)!r}"
            for f in INHERITED if getattr(variant, f) != getattr(base, f)]


class Residency:
    """Which model replicas hold which variants, as the ingress last heard from each (every
    answer of a replica with variants carries its :class:`VariantReport`): what the ingress
    needs to load a variant once (:class:`serve_app.serve.handles.VariantBackend`)."""

    def __init__(self) -> None:
        self._held: dict[str, frozenset[str]] = {}

    def update(self, report: VariantReport | None) -> None:
        if report is not None:
            self._held[report.replica] = frozenset(report.resident)

    def holders(self, name: str) -> tuple[str, ...]:
        """The model replicas that last said they hold ``name``."""
        return tuple(sorted(r for r, names in self._held.items() if name in names))


class Variant:
    """A loaded variant: its model, and the hook Serve's multiplexer calls when it evicts it."""

    def __init__(self, name: str, model: ModelRunner, host: VariantHost) -> None:
        self.name = name
        self.model = model
        self._host = host
        self._gone = False

    def __del__(self) -> None:
        # Serve calls this when it evicts the variant (on a thread of its own), and Python once
        # more when the object goes: count one eviction.
        if not self._gone:
            self._gone = True
            self._host.unloaded(self.name)


def _quiet(task: asyncio.Future[Any]) -> None:
    """A load nobody waits for any more (its requests timed out) still ends without a warning;
    its failure was logged and counted already."""
    if not task.cancelled():
        task.exception()


class VariantHost:
    """The variants of ``cfg`` (an entry with ``variants``) in one replica, beside ``base``.

    ``build`` turns a variant's config (the entry's, with the variant's name and checkpoint)
    into a model sharing the base's threads and input bound; it runs on a worker thread.
    ``replica`` names this replica in reports.
    """

    def __init__(self, cfg: ModelConfig, base: ModelInfo,
                 build: Callable[[ModelConfig], ModelRunner], replica: str = "") -> None:
        assert cfg.variants is not None
        self.cfg = cfg
        self.options = cfg.variants
        self.sources = cfg.variants.sources
        self.base = base
        self._build = build
        self.replica = replica
        self.resident: dict[str, Variant] = {}
        # appended on Serve's eviction thread too: deques are safe to share
        self._loads: collections.deque[tuple[str, float, bool]] = collections.deque()
        self._evictions: collections.deque[str] = collections.deque()
        self.counts = {"loads": 0, "failed_loads": 0, "evictions": 0, "load_seconds": 0.0}

    def config_of(self, name: str) -> ModelConfig:
        """The config a variant loads with: the entry's, with its own name and checkpoint."""
        try:
            source = self.sources[name]
        except KeyError:
            raise ModelNotFound(f"model {self.cfg.name!r} has no variant {name!r}; its variants: "
                                f"{list(self.sources)}", param="model") from None
        return self.cfg.model_copy(update={"name": name, "model_id": source,
                                           "model_revision": None, "variants": None})

    async def load(self, name: str) -> Variant:
        """Build ``name``'s model off the event loop and check it against the base. Any failure
        is :class:`ModelNotReady` for the callers of that variant only (logged, counted; the
        next request tries again)."""
        cfg = self.config_of(name)
        t0 = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._build, cfg)
            if wrong := differences(self.base, await model.info()):
                raise ValueError(f"it is not a variant of {self.cfg.name!r}: {'; '.join(wrong)}")
        except Exception as e:  # the checkpoint's own failure, whatever it is: its callers' 503
            seconds = time.perf_counter() - t0
            log.exception("variant %r (%s) failed to load after %.2fs", name, cfg.model_id, seconds)
            self._loaded(name, seconds, False)
            raise ModelNotReady(f"variant {name!r} failed to load: {e}", param="model") from e
        self._loaded(name, time.perf_counter() - t0, True)
        variant = self.resident[name] = Variant(name, model, self)
        return variant

    def _loaded(self, name: str, seconds: float, ok: bool) -> None:
        self._loads.append((name, seconds, ok))
        self.counts["loads" if ok else "failed_loads"] += 1
        self.counts["load_seconds"] += seconds
        if ok:
            log.info("variant %r loaded in %.2fs (%d resident)", name, seconds,
                     len(self.resident) + 1)

    def unloaded(self, name: str) -> None:
        self.resident.pop(name, None)
        self._evictions.append(name)
        self.counts["evictions"] += 1
        log.info("variant %r unloaded (least recently used)", name)

    async def get(self, name: str, load: Callable[[str], Awaitable[Variant]],
                  holders: tuple[str, ...] = ()) -> ModelRunner:
        """``name``'s model through ``load`` (Serve's multiplexed loader, which loads it if this
        replica does not hold it), waiting for a load at most ``load_timeout_s``: past it,
        :class:`ModelNotReady` (503, retry) while the load goes on for later requests; a replica
        not among ``holders`` raises :class:`Misrouted` rather than load it too."""
        if name not in self.resident and holders and self.replica not in holders:
            raise Misrouted(f"variant {name!r} is held by another replica", param="model")
        task = asyncio.ensure_future(load(name))
        task.add_done_callback(_quiet)
        try:
            variant = await asyncio.wait_for(asyncio.shield(task), self.options.load_timeout_s)
        except TimeoutError:
            raise ModelNotReady(
                f"variant {name!r} is still loading after {self.options.load_timeout_s:g}s "
                "(variants.load_timeout_s); retry shortly", param="model") from None
        return variant.model

    def report(self) -> VariantReport:
        """What happened since the previous report, and what is resident now."""
        loads = [self._loads.popleft() for _ in range(len(self._loads))]
        evictions = [self._evictions.popleft() for _ in range(len(self._evictions))]
        return VariantReport(self.cfg.name, self.replica, tuple(self.resident), tuple(loads),
                             tuple(evictions))

    def stats(self) -> dict[str, Any]:
        """What ``/v2/models/{name}/stats`` reports of this replica's variants."""
        return {"replica": self.replica, "resident": list(self.resident),
                "max_loaded": self.options.max_loaded, **self.counts}
