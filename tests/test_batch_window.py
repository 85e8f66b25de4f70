"""The batch queue's window (``batching.batch_wait_timeout_s``): work arriving at an idle queue
waits that long for company, unless a full pass waits already; with 0 a pass starts at once."""

from __future__ import annotations

import asyncio

import numpy as np

from serve_app.runtime.batch_queue import BatchQueue, Work


def _queue(wait_s: float, sizes: list[int], max_batch_size: int = 4) -> BatchQueue:
    def compute(seqs: list[list[int]]) -> np.ndarray:
        sizes.append(len(seqs))
        return np.zeros((len(seqs), 2), np.float32)

    return BatchQueue(compute, max_batch_size, 10_000, wait_s=wait_s)


def _work(n: int = 1) -> Work:
    return Work([[1, 2]] * n, asyncio.get_running_loop().create_future())


def test_an_idle_queue_holds_its_first_pass_for_the_window():
    sizes: list[int] = []

    async def main() -> None:
        q = _queue(0.05, sizes)
        first, second = _work(), _work()
        q.put([first])
        await asyncio.sleep(0)  # the loop turns: a queue without a window would start a pass
        assert q.running == 0 and q.queued == 1
        q.put([second])
        await asyncio.gather(first.future, second.future)

    asyncio.run(main())
    assert sizes == [2]  # the second joined the first's pass


def test_a_full_pass_starts_without_waiting_and_no_window_means_at_once():
    sizes: list[int] = []

    async def main() -> None:
        q = _queue(30.0, sizes)  # a window longer than the test may take
        full = _work(4)
        q.put([full])
        assert q.running == 1
        await full.future
        lone = BatchQueue(q._compute, 4, 10_000)  # wait_s 0
        w = _work()
        lone.put([w])
        assert lone.running == 1
        await w.future

    asyncio.run(asyncio.wait_for(main(), 10))
    assert sizes == [4, 1]
