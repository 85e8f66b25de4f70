"""The replica's batch queue and model path, without Ray. Passes are driven by events, never by
sleeps: the fake forward pass blocks until the test releases it, so what forms each pass is
decided by what the test queued, not by timing."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.errors import DeadlineExceeded, Overloaded
from serve_app.runtime.batch_queue import (
    FAIR_EVERY,
    LARGE_PASS_TOKENS,
    SPLIT_S,
    BatchQueue,
    Work,
)
from serve_app.runtime.runner import INLINE_TOKENIZE_CHARS, ModelRunner
from serve_app.types import EmbedRequest


class Gate:
    """A fake forward pass that waits for the test. Each call records its sequences' first token
    ids, announces itself (:meth:`started`) and returns only once :meth:`release`\\ d. Row i of
    the answer is ``[first token id, length]`` of sequence i."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[int]] = []
        self._loop = asyncio.get_running_loop()
        self._started: asyncio.Queue[list[int]] = asyncio.Queue()
        self._go = threading.Semaphore(0)
        self.fail = fail

    def __call__(self, seqs: list[list[int]]) -> np.ndarray:
        firsts = [s[0] for s in seqs]
        self.calls.append(firsts)
        self._loop.call_soon_threadsafe(self._started.put_nowait, firsts)
        assert self._go.acquire(timeout=30), "the test never released this pass"
        if self.fail:
            raise RuntimeError("forward failed")
        return np.array([[s[0], len(s)] for s in seqs], dtype=np.float32)

    async def started(self) -> list[int]:
        """The next pass's first token ids, once it has started."""
        return await asyncio.wait_for(self._started.get(), 30)

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._go.release()


def work(*seqs: list[int], deadline: float | None = None,
         owner: asyncio.Task | None = None, priority: int = 1) -> Work:
    return Work([list(s) for s in seqs], asyncio.get_running_loop().create_future(), deadline,
                owner, priority=priority)


def one(i: int, priority: int = 1) -> Work:
    """A request of one one-token text, token id ``i``, at priority ``priority``."""
    return work([i], priority=priority)


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


def test_passes_fill_while_the_model_is_busy():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=16, max_batch_tokens=10_000)
        first = one(1)
        queue.put([first])
        assert await gate.started() == [1]  # alone: it starts at once
        rest = [one(i) for i in range(2, 42)]
        queue.put(rest)  # 40 arrive while the model is busy
        gate.release(4)
        assert await gate.started() == list(range(2, 18))
        assert await gate.started() == list(range(18, 34))
        assert await gate.started() == list(range(34, 42))
        assert (await first.future).tolist() == [[1, 1]]
        assert [(await w.future)[0, 0] for w in rest] == list(range(2, 42))
        assert queue.stats.as_dict()["max_batch"] == 16 and queue.stats.passes == 4

    run(main())


def test_a_pass_holds_at_most_its_padded_token_budget_longest_first():
    """Texts of one request go longest first; a pass stops before its texts times the longest
    one exceed the budget. Answers come back in input order."""
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=32, max_batch_tokens=18)
        w = work([1] * 3, [2] * 9, [3] * 5, [4] * 9)
        queue.put([w])
        assert await gate.started() == [2, 4]  # 2 x 9 = 18 tokens
        gate.release()
        assert await gate.started() == [3, 1]  # 2 x 5
        gate.release()
        assert (await w.future).tolist() == [[1, 3], [2, 9], [3, 5], [4, 9]]
        assert queue.stats.tokens == 26

    run(main())


def test_a_text_over_the_budget_gets_a_pass_of_its_own():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=32, max_batch_tokens=4)
        w = work([1] * 9, [2])
        queue.put([w])
        assert await gate.started() == [1]
        gate.release()
        assert await gate.started() == [2]
        gate.release()
        assert (await w.future)[:, 1].tolist() == [9, 1]

    run(main())


def test_requests_share_a_pass_oldest_first_and_a_large_one_spans_several():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=4, max_batch_tokens=10_000)
        blocker = one(100)
        queue.put([blocker])
        await gate.started()
        a, b, c = work([1], [2], [3]), work([4], [5], [6]), one(7)
        queue.put([a, b, c])
        gate.release(3)
        assert await gate.started() == [1, 2, 3, 4]
        assert await gate.started() == [5, 6, 7]
        assert (await b.future)[:, 0].tolist() == [4, 5, 6]
        assert len(b.passes) == 2  # its inference time is the sum of both passes

    run(main())


def test_a_failing_pass_fails_only_its_callers_and_the_queue_lives_on():
    async def main():
        gate = Gate(fail=True)
        queue = BatchQueue(gate, max_batch_size=4, max_batch_tokens=10_000)
        bad = one(1)
        queue.put([bad])
        await gate.started()
        gate.release()
        with pytest.raises(RuntimeError, match="forward failed"):
            await bad.future
        gate.fail = False
        good = one(2)
        queue.put([good])
        await gate.started()
        gate.release()
        assert (await good.future).tolist() == [[2, 1]]

    run(main())


def test_work_whose_caller_left_or_deadline_passed_is_dropped_at_the_queue():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=8, max_batch_tokens=10_000)
        queue.put([one(1)])
        await gate.started()  # the model is busy; what follows waits in the queue
        waiter = asyncio.create_task(asyncio.Event().wait())
        gone = work([2], owner=waiter)
        late = work([3], deadline=time.time() - 1)
        kept = work([4], deadline=time.time() + 60)
        queue.put([gone, late, kept])
        waiter.cancel()
        await asyncio.sleep(0)  # the cancellation lands
        gate.release(2)
        assert await gate.started() == [4]  # neither 2 nor 3 reached the model
        assert gone.future.cancelled()
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert (await kept.future).tolist() == [[4, 1]]
        assert queue.stats.dropped == 2 and gate.calls == [[1], [4]]

    run(main())


def test_a_second_pass_starts_only_for_half_a_batch_and_passes_split_the_queue():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=8, max_batch_tokens=10_000, passes=2)
        queue.put([one(1)])
        assert await gate.started() == [1]
        queue.put([one(i) for i in range(2, 5)])  # 3 waiting: below half a batch (4)
        assert queue.running == 1 and queue.queued == 3  # they wait for the running pass
        queue.put([one(5)])  # 4 waiting: the idle worker takes them
        assert await gate.started() == [2, 3, 4, 5]
        gate.release(2)
        while queue.running:  # both passes end
            await asyncio.sleep(0)
        # both workers start at once with 10 waiting: each takes its share
        queue.put([one(i) for i in range(6, 16)])
        assert sorted(map(len, [await gate.started(), await gate.started()])) == [5, 5]
        gate.release(2)

    run(main())


def test_few_long_texts_get_a_pass_beside_a_running_one_once_passes_are_timed():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=8, max_batch_tokens=10_000, passes=2)
        queue.put([one(1)])
        assert await gate.started() == [1]
        gate.release()
        while queue.running:
            await asyncio.sleep(0)
        assert queue._token_s is None  # a small pass times nothing
        queue.put([work([1] * LARGE_PASS_TOKENS)])
        assert await gate.started() == [1]
        gate.release()
        while queue.running:
            await asyncio.sleep(0)
        assert queue._token_s is not None  # large passes are timed per padded token
        queue._token_s = SPLIT_S / 100  # as if a padded token took this long
        queue.put([work([1] * 200)])
        assert await gate.started() == [1]
        queue.put([work([2] * 100), work([3] * 100)])  # fewer than half a batch, but long
        assert await gate.started() == [2, 3] and queue.running == 2
        queue.put([one(4)])  # a short straggler waits for a running pass
        assert queue.running == 2 and queue.queued == 1
        gate.release(3)

    run(main())


def test_the_highest_level_waiting_forms_the_next_pass_alone():
    """Level 1 goes before older priority-10 work, and a pass holds one priority only: the query's
    pass is not filled with bulk texts."""
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=16, max_batch_tokens=10_000)
        queue.put([one(1, priority=10)])
        assert await gate.started() == [1]
        queue.put([one(2, priority=10), one(3, priority=10), one(4), one(5, priority=3)])
        assert queue.queued_by_priority() == {1: 1, 3: 1, 10: 2}
        gate.release()
        assert await gate.started() == [4]
        gate.release()
        assert await gate.started() == [5]
        gate.release()
        assert await gate.started() == [2, 3]
        gate.release()

    run(main())


def test_a_lower_level_gets_one_pass_in_fair_every_under_a_steady_stream():
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=1, max_batch_tokens=10_000)
        queue.put([one(0)])
        assert await gate.started() == [0]
        bulk = one(99, priority=10)
        queue.put([bulk, one(1)])
        served = []
        for i in range(2, 2 + 2 * FAIR_EVERY):
            queue.put([one(i)])  # a query keeps arriving while every pass runs
            gate.release()
            served.append((await gate.started())[0])
        gate.release(len(served) + 1)
        assert 99 in served[:FAIR_EVERY]  # served within FAIR_EVERY passes
        await bulk.future

    run(main())


def test_work_above_every_running_pass_starts_a_pass_beside_them():
    """Below half a batch a second pass waits for the running one, except for work of a
    higher priority than it: a query does not wait behind a bulk pass while a thread is free."""
    async def main():
        gate = Gate()
        queue = BatchQueue(gate, max_batch_size=32, max_batch_tokens=10_000, passes=2)
        queue.put([one(1, priority=10)])
        assert await gate.started() == [1]
        queue.put([one(2, priority=10)])
        queue.put([one(3)])
        assert await gate.started() == [3]  # beside the running bulk pass, at once
        gate.release(2)
        assert await gate.started() == [2]
        gate.release()

    run(main())


def test_a_pass_alone_runs_solo_and_holds_the_other_worker_back():
    async def main():
        gate, solo = Gate(), Gate()
        queue = BatchQueue(gate, max_batch_size=8, max_batch_tokens=10_000, passes=2,
                           solo=solo)
        queue.put([one(1)])
        assert await solo.started() == [1]  # alone: on every thread
        queue.put([one(i) for i in range(2, 10)])  # a full batch waits ...
        assert queue.running == 1 and queue.queued == 8  # ... but none starts beside a solo one
        solo.release()
        firsts = [await gate.started(), await gate.started()]
        assert sorted(x for f in firsts for x in f) == list(range(2, 10))
        gate.release(2)

    run(main())


def test_a_lone_small_pass_runs_inline_once_small_passes_measure_short():
    """The first small pass runs on a forward thread (nothing is measured yet); once small
    passes measure under ``inline_s``, a lone one runs on the event loop's own thread; a pass
    beside another, a large one, or any pass with ``inline_s`` 0, never does."""
    async def main():
        threads: list[str] = []

        def compute(seqs: list[list[int]]) -> np.ndarray:
            threads.append(threading.current_thread().name)
            return np.zeros((len(seqs), 2), dtype=np.float32)

        loop_thread = threading.current_thread().name
        for inline_s, expected in ((1.0, ["forward", loop_thread, "forward"]),
                                   (0.0, ["forward", "forward", "forward"])):
            threads.clear()
            queue = BatchQueue(compute, max_batch_size=8, max_batch_tokens=10_000, passes=2,
                               executor=ThreadPoolExecutor(2, thread_name_prefix="forward"),
                               inline_s=inline_s)
            for w in (one(1), one(2), work([3] * 100)):  # small, small, large: one at a time
                queue.put([w])
                await w.future
            assert [t.split("_")[0] for t in threads] == expected, threads

    run(main())


def test_the_coalescer_sends_what_arrives_together_as_one_call_and_holds_nothing():
    """Requests submitted in one turn of the event loop go as one call, at the end of that
    turn; one submitted while a call is in flight goes at once in a call of its own (nothing
    waits for a call to return); each gets its own result or error."""
    from serve_app.serve.coalesce import Coalescer

    async def main():
        calls: list[list[int]] = []
        gates: list[asyncio.Future[None]] = []

        async def send(reqs: list[int]) -> list[int | BaseException]:
            calls.append(reqs)
            gate = asyncio.get_running_loop().create_future()
            gates.append(gate)
            await gate
            return [ValueError(r) if r == 13 else r * 10 for r in reqs]

        async def settle() -> None:  # a few turns of the loop: tasks started run until they wait
            for _ in range(5):
                await asyncio.sleep(0)

        c: Coalescer[int, int] = Coalescer(send)
        together = [asyncio.ensure_future(c.submit(r)) for r in (1, 13, 3)]  # one turn
        await settle()
        assert calls == [[1, 13, 3]]
        alone = asyncio.ensure_future(c.submit(4))  # the first call still flies
        await settle()
        assert calls == [[1, 13, 3], [4]]
        gates[1].set_result(None)
        assert await alone == 40
        gates[0].set_result(None)
        assert await together[0] == 10 and await together[2] == 30
        with pytest.raises(ValueError):
            await together[1]
        assert c.calls == 2

    run(main())


# -- the model replica: admission, tokenizing, dimensions (the real engine) ------------------

def test_replica_embeds_large_requests_in_passes_and_applies_dimensions(engine):
    texts = tuple(f"sentence number {i}" for i in range(70))

    async def main():
        model = ModelRunner(engine, "m")
        full = await model.embed(EmbedRequest(model="m", inputs=texts))
        cut = await model.embed(EmbedRequest(model="m", inputs=texts[:3], dimensions=8))
        return model, full, cut

    model, full, cut = asyncio.run(main())
    assert model.queue.stats.sizes[32] == 2 and model.queue.stats.sizes[6] == 1
    assert full.embeddings.shape == (70, 384) and full.token_counts.shape == (70,)
    direct, counts = engine.embed(list(texts))
    np.testing.assert_allclose(full.embeddings, direct, atol=2e-6)
    assert full.prompt_tokens == counts.sum() and full.inference_s > 0
    assert cut.embeddings.shape == (3, 8)
    np.testing.assert_allclose(
        cut.embeddings, direct[:3, :8] / np.linalg.norm(direct[:3, :8], axis=1, keepdims=True),
        rtol=1e-5, atol=1e-6,
    )


def test_replica_refuses_past_its_input_bound_at_once_and_recovers(engine):
    """Admission counts inputs, not requests: with 40 inputs held, a 30-input request is
    refused straight away (no model work), a 10-input one is admitted, and once the held
    work finishes the bound is free again."""
    async def main():
        gate = Gate()
        model = ModelRunner(engine, "m", max_queued_inputs=50)
        model.queue = BatchQueue(gate, max_batch_size=64, max_batch_tokens=100_000)
        held = asyncio.create_task(model.embed(EmbedRequest(model="m", inputs=("a",) * 40)))
        await gate.started()
        assert model.queued_inputs() == 40
        with pytest.raises(Overloaded, match="40 of 50 inputs"):
            await model.embed(EmbedRequest(model="m", inputs=("b",) * 30))
        fits = asyncio.create_task(model.embed(EmbedRequest(model="m", inputs=("c",) * 10)))
        gate.release(2)
        await held
        await fits
        assert model.queued_inputs() == 0 and model.admission.refused == 1
        gate.release()
        again = await model.embed(EmbedRequest(model="m", inputs=("b",) * 30))
        assert again.embeddings.shape == (30, 2)

    run(main())


def test_replica_drops_a_request_whose_deadline_passed(engine):
    with pytest.raises(DeadlineExceeded):
        asyncio.run(ModelRunner(engine, "m").embed(
            EmbedRequest(model="m", inputs=("x",), deadline=time.time() - 1)))


def test_short_requests_are_tokenized_on_the_loop_long_ones_on_the_pool(engine, monkeypatch):
    where: list[str] = []
    prepare = engine.prepare

    def recording(*args, **kw):
        where.append(threading.current_thread().name)
        return prepare(*args, **kw)

    monkeypatch.setattr(engine, "prepare", recording)
    short = ("a short text",)
    long = ("word " * (INLINE_TOKENIZE_CHARS // 5 + 1),)

    async def main():
        model = ModelRunner(engine, "m")
        for inputs in (short, long):
            await model.embed(EmbedRequest(model="m", inputs=inputs))

    asyncio.run(main())
    assert where[0] == threading.current_thread().name  # the loop's own thread
    assert where[1].startswith("tokenize")


def test_forward_sets_torch_threads_for_its_calling_thread_only():
    """What solo passes rely on: a pass that runs on all threads (its own OS thread) leaves the
    other passes' threads as they were, so they do not oversubscribe the cores afterwards."""
    import torch

    engine = EmbeddingEngine(ModelConfig(backend="torch"), num_threads=2)

    seqs, _ = engine.tokenize(["a short text"])
    lanes = {"share": ThreadPoolExecutor(1), "solo": ThreadPoolExecutor(1)}
    lanes["share"].submit(engine.forward, seqs, 1).result()
    lanes["solo"].submit(engine.forward, seqs, 2).result()
    seen = {name: lane.submit(torch.get_num_threads).result() for name, lane in lanes.items()}
    assert seen == {"share": 1, "solo": 2}


def test_a_pass_runs_solo_only_on_a_backend_that_takes_threads_per_call(engine):
    """ONNX Runtime and OpenVINO fix each pass's threads at load: a lone pass there would hold
    the other worker back and gain no threads."""
    runner = ModelRunner(engine, "m", passes=2, threads=2)
    assert (runner.queue._solo is not None) == engine.backend.threads_per_call
    assert engine.backend.threads_per_call == (engine.backend.name == "torch")


def test_plan_parallelism():
    import torch

    from serve_app.engine.embedding import plan_parallelism

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan_parallelism(1, cpu) == (1, 1)
    assert plan_parallelism(2, cpu) == (2, 1)
    assert plan_parallelism(8, cpu) == (2, 4)
    assert plan_parallelism(7, cpu) == (2, 3)
    assert plan_parallelism(8, cuda) == (1, 8)
    assert plan_parallelism(8, cpu, 4) == (4, 2)
    assert plan_parallelism(2, cpu, 1) == (1, 2)
    assert plan_parallelism(2, cpu, 3) == (3, 1)
