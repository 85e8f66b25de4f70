"""An in-process model backend: the replica's runner and batcher without Ray.

Used by the protocol tests and by benchmarks that need the app without Serve's hops.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from serve_app.batching import Group, ModelRunner, forward_batcher, replica_stats
from serve_app.engine import EmbeddingEngine
from serve_app.types import EmbedRequest, EmbedResult, ModelInfo


class LocalBackend:
    """A :class:`serve_app.router.ModelBackend` running ``engine`` in this process."""

    def __init__(self, engine: EmbeddingEngine, name: str, version: str = "1",
                 max_queued_inputs: int = 4096, parallel_passes: int = 1,
                 threads: int = 1) -> None:
        self.batcher = forward_batcher(engine, parallel_passes, threads)
        self.runner = ModelRunner(engine, self._submit, max_queued_inputs,
                                  passes=self.batcher.take_passes,
                                  parallel_passes=parallel_passes)
        self._info = engine.info(name, version)

    async def _submit(self, group: Group) -> np.ndarray | BaseException:
        (vectors,) = await self.batcher.run([group])
        return vectors

    async def embed(self, req: EmbedRequest) -> EmbedResult:
        return await self.runner.embed(req)

    async def info(self) -> ModelInfo:
        return self._info

    async def stats(self) -> dict[str, Any]:
        return replica_stats(self.batcher, self.runner)

    async def ready(self) -> bool:
        return True

    def queued_inputs(self) -> int:
        return self.runner.bound.held
