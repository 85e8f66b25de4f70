"""The drain batcher and the runner, without Ray."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from serve_app.batching import DrainBatcher, Group, ModelRunner
from serve_app.errors import DeadlineExceeded, InvalidInput, Overloaded
from serve_app.types import EmbedRequest


def slow_compute(delay: float, calls: list[int]):
    """A fake forward: row i is [first token id, len]; records pass sizes."""

    def compute(seqs):
        calls.append(len(seqs))
        time.sleep(delay)
        return np.array([[s[0], len(s)] for s in seqs], dtype=np.float32)

    return compute


def G(*ids: int, **kw) -> Group:
    """A group of one-token sequences."""
    return Group([[i] for i in ids], **kw)


def test_passes_fill_while_the_model_is_busy():
    calls: list[int] = []
    batcher = DrainBatcher(slow_compute(0.05, calls), max_batch_size=16)

    async def main():
        # one request arrives first and occupies the model; 40 more arrive meanwhile
        first = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.01)
        rest = await asyncio.gather(*(batcher.run([G(i + 2)]) for i in range(40)))
        return await first, rest

    first, rest = asyncio.run(main())
    assert first[0].tolist() == [[1, 1]]
    assert [r[0][0, 0] for r in rest] == [i + 2 for i in range(40)]  # each gets its own row
    assert calls[0] == 1 and calls[1:] == [16, 16, 8]
    assert batcher.stats.as_dict()["max_batch"] == 16


def test_groups_are_never_split_and_order_is_kept():
    calls: list[int] = []
    batcher = DrainBatcher(slow_compute(0.0, calls), max_batch_size=5)

    async def main():
        return await batcher.run([G(1, 2, 3), G(4, 5), G(6, 7, 8)])

    out = asyncio.run(main())
    assert [o[:, 0].tolist() for o in out] == [[1, 2, 3], [4, 5], [6, 7, 8]]
    assert calls == [5, 3]


def test_a_failing_pass_fails_only_its_callers_and_the_loop_lives_on():
    state = {"fail": True}

    def compute(seqs):
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("boom")
        return np.zeros((len(seqs), 2), np.float32)

    batcher = DrainBatcher(compute, max_batch_size=4)

    async def main():
        (failed,) = await batcher.run([G(1)])
        assert isinstance(failed, RuntimeError) and "boom" in str(failed)
        return await batcher.run([G(1), G(2)])

    assert len(asyncio.run(main())) == 2


def test_cancelled_work_never_reaches_the_model():
    calls: list[int] = []
    gate = threading.Event()

    def compute(seqs):
        calls.append(len(seqs))
        gate.wait(5)
        return np.zeros((len(seqs), 2), np.float32)

    batcher = DrainBatcher(compute, max_batch_size=8)

    async def main():
        busy = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(batcher.run([G(2), G(3)]))
        kept = asyncio.create_task(batcher.run([G(4)]))
        await asyncio.sleep(0.02)
        gone.cancel()  # the client went away while the model was busy
        gate.set()
        await busy
        await kept

    asyncio.run(main())
    assert calls == [1, 1]
    assert batcher.stats.dropped == 2


def test_work_of_a_request_that_went_away_or_expired_is_dropped():
    """A group whose owning task is cancelled (Serve cancels the replica's task when the caller
    disconnects) or whose deadline passed while the model was busy never reaches the model;
    the expired caller gets DeadlineExceeded, the others in the same batch their vectors."""
    calls: list[list[float]] = []
    gate = threading.Event()

    def compute(seqs):
        calls.append([s[0] for s in seqs])
        gate.wait(5)
        return np.array([[s[0], 0] for s in seqs], np.float32)

    batcher = DrainBatcher(compute, max_batch_size=8)

    async def main():
        busy = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.02)
        owner = asyncio.create_task(asyncio.sleep(10))
        out = asyncio.create_task(batcher.run([
            G(2, deadline=time.time() + 0.01), G(3, owner=owner), G(4, deadline=time.time() + 9),
        ]))
        await asyncio.sleep(0.05)
        owner.cancel()
        await asyncio.sleep(0)
        gate.set()
        await busy
        return await out

    expired, gone, kept = asyncio.run(main())
    assert calls == [[1], [4]]
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(gone, asyncio.CancelledError)
    assert kept[:, 0].tolist() == [4]
    assert batcher.stats.dropped == 2


def test_runner_splits_large_requests_and_applies_dimensions(engine):
    seen: list[int] = []

    async def submit(group):
        seen.append(len(group))
        return engine.embed_ids(group.seqs)

    runner = ModelRunner(engine, submit)
    texts = tuple(f"sentence number {i}" for i in range(70))

    async def main():
        full = await runner.embed(EmbedRequest(model="m", inputs=texts))
        cut = await runner.embed(EmbedRequest(model="m", inputs=texts[:3], dimensions=8))
        return full, cut

    full, cut = asyncio.run(main())
    assert seen[:3] == [32, 32, 6]
    assert full.embeddings.shape == (70, 384) and full.token_counts.shape == (70,)
    direct, counts = engine.embed(list(texts))
    np.testing.assert_allclose(full.embeddings, direct, atol=2e-6)
    assert full.prompt_tokens == counts.sum()
    assert cut.embeddings.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(cut.embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        cut.embeddings, direct[:3, :8] / np.linalg.norm(direct[:3, :8], axis=1, keepdims=True),
        rtol=1e-5, atol=1e-6,
    )


@pytest.mark.parametrize("dims", [0, -1, 385])
def test_runner_refuses_impossible_dimensions(engine, dims):
    async def submit(group):
        raise AssertionError("must not be reached")

    runner = ModelRunner(engine, submit)
    with pytest.raises(InvalidInput, match="dimensions must be between 1 and 384"):
        asyncio.run(runner.embed(EmbedRequest(model="m", inputs=("x",), dimensions=dims)))


def test_runner_refuses_past_its_queue_bound_at_once_and_recovers(engine):
    """Admission counts inputs, not requests: with 40 inputs held, a 30-input request is
    refused straight away (no model work), a 10-input one is admitted, and once the held
    work finishes the bound is free again."""
    async def main():
        gate = asyncio.Event()

        async def submit(group):
            await gate.wait()
            return engine.embed_ids(group.seqs)

        runner = ModelRunner(engine, submit, max_queued_inputs=50)
        held = asyncio.create_task(runner.embed(EmbedRequest(model="m", inputs=("a",) * 40)))
        await asyncio.sleep(0.1)
        assert runner.bound.held == 40
        with pytest.raises(Overloaded, match="40 of 50 inputs"):  # while the gate is shut
            await runner.embed(EmbedRequest(model="m", inputs=("b",) * 30))
        fits = asyncio.create_task(runner.embed(EmbedRequest(model="m", inputs=("c",) * 10)))
        await asyncio.sleep(0.05)
        gate.set()
        await held
        await fits
        assert runner.bound.held == 0 and runner.bound.refused == 1
        again = await runner.embed(EmbedRequest(model="m", inputs=("b",) * 30))
        assert again.embeddings.shape == (30, 384)

    asyncio.run(main())


def test_runner_refuses_a_request_whose_deadline_passed_while_tokenizing(engine):
    async def submit(group):
        raise AssertionError("must not be reached")

    runner = ModelRunner(engine, submit)
    with pytest.raises(DeadlineExceeded):
        asyncio.run(runner.embed(EmbedRequest(model="m", inputs=("x",),
                                              deadline=time.time() - 1)))


def test_parallel_passes_run_at_once_and_each_takes_what_is_pending():
    """With passes=2 a second pass starts while the first computes (the barrier needs both
    in it at once), on the groups that arrived meanwhile; a third waits for a free worker."""
    calls: list[list[float]] = []
    both = threading.Barrier(2, timeout=5)

    def compute(seqs):
        calls.append([s[0] for s in seqs])
        if len(calls) <= 2:
            both.wait()  # raises BrokenBarrierError unless two passes are in here together
        return np.array([[s[0], len(s)] for s in seqs], np.float32)

    batcher = DrainBatcher(compute, max_batch_size=4, passes=2)

    async def main():
        first = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.run([G(2), G(3)]))
        await asyncio.sleep(0.02)
        third = asyncio.create_task(batcher.run([G(4)]))
        return await first, await second, await third

    first, second, third = asyncio.run(main())
    assert first[0][:, 0].tolist() == [1]
    assert [o[:, 0].tolist() for o in second] == [[2], [3]]
    assert third[0][:, 0].tolist() == [4]
    assert calls[:2] == [[1], [2, 3]] and calls[2:] == [[4]]
    assert batcher.stats.passes == 3


def test_short_requests_are_tokenized_on_the_loop_long_ones_on_the_pool(engine, monkeypatch):
    from serve_app.batching import INLINE_TOKENIZE_CHARS

    where: list[str] = []
    prepare = engine.prepare

    def recording(*args, **kw):
        where.append(threading.current_thread().name)
        return prepare(*args, **kw)

    monkeypatch.setattr(engine, "prepare", recording)

    async def submit(group):
        return engine.embed_ids(group.seqs)

    runner = ModelRunner(engine, submit)
    short = ("a short text",)
    long = ("word " * (INLINE_TOKENIZE_CHARS // 5 + 1),)

    async def main():
        for inputs in (short, long):
            await runner.embed(EmbedRequest(model="m", inputs=inputs))

    asyncio.run(main())
    assert where[0] == threading.current_thread().name  # the loop's own thread
    assert where[1].startswith("tokenize")


def test_a_second_pass_starts_only_for_half_a_batch_of_waiting_work():
    """With passes=2 and max_batch_size=8, one straggler waits for the running pass and joins
    the next full pass instead of taking the other worker for a pass of one; four waiting
    texts (half a batch) start a second pass at once."""
    calls: list[list[float]] = []
    both = threading.Barrier(2, timeout=5)
    gate = threading.Event()

    def compute(seqs):
        calls.append([s[0] for s in seqs])
        if len(calls) == 1:
            gate.wait(5)
        elif len(calls) == 3:
            both.wait()  # only reached if the fourth pass runs beside this one
        return np.array([[s[0], len(s)] for s in seqs], np.float32)

    batcher = DrainBatcher(compute, max_batch_size=8, passes=2)

    async def main():
        first = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.02)
        straggler = asyncio.create_task(batcher.run([G(2)]))
        await asyncio.sleep(0.05)
        assert calls == [[1]]  # the straggler did not start a pass of its own
        gate.set()
        await first, await straggler
        assert calls == [[1], [2]]
        gate.clear()
        blocker = asyncio.create_task(batcher.run([G(10)]))
        await asyncio.sleep(0.02)
        half = asyncio.create_task(batcher.run([G(11, 12, 13, 14)]))
        await asyncio.sleep(0.05)
        both.wait()  # the pass of four runs while the blocker's pass still runs
        gate.set()
        await blocker, await half

    asyncio.run(main())
    assert calls[3] == [11, 12, 13, 14]


def test_a_pass_alone_runs_solo_and_holds_the_other_workers_back():
    """``solo`` computes a pass that has the batcher to itself (all threads); while it runs no
    other pass starts, and work that arrives meanwhile runs in the normal passes."""
    calls: list[tuple[str, list[float]]] = []
    gate = threading.Event()

    def compute(kind):
        def run(seqs):
            calls.append((kind, [s[0] for s in seqs]))
            if len(calls) == 1:
                gate.wait(5)
            return np.array([[s[0], len(s)] for s in seqs], np.float32)
        return run

    batcher = DrainBatcher(compute("share"), max_batch_size=4, passes=2, solo=compute("solo"))

    async def main():
        lone = asyncio.create_task(batcher.run([G(1)]))
        await asyncio.sleep(0.02)
        rest = asyncio.create_task(batcher.run([G(2, 3), G(4, 5)]))  # a full batch waits
        await asyncio.sleep(0.05)
        assert calls == [("solo", [1])]  # nothing beside the solo pass
        gate.set()
        return await lone, await rest

    lone, rest = asyncio.run(main())
    assert lone[0][:, 0].tolist() == [1]
    assert [r[:, 0].tolist() for r in rest] == [[2, 3], [4, 5]]
    assert sorted(calls[1:]) == [("share", [2, 3]), ("share", [4, 5])]


def test_embed_ids_sets_torch_threads_for_its_calling_thread_only(engine):
    """What solo passes rely on: a pass that runs on all threads (its own OS thread) leaves the
    other passes' threads as they were, so they do not oversubscribe the cores afterwards."""
    import torch

    seqs = engine.tokenize(["a short text"])
    seen: dict[str, int] = {}
    lanes = {"share": ThreadPoolExecutor(1), "solo": ThreadPoolExecutor(1)}
    lanes["share"].submit(engine.embed_ids, seqs, 1).result()
    lanes["solo"].submit(engine.embed_ids, seqs, 2).result()
    for name, lane in lanes.items():
        seen[name] = lane.submit(torch.get_num_threads).result()
    assert seen == {"share": 1, "solo": 2}


def test_plan_parallelism():
    import torch

    from serve_app.engine import plan_parallelism

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert plan_parallelism(1, cpu) == (1, 1)
    assert plan_parallelism(2, cpu) == (2, 1)
    assert plan_parallelism(8, cpu) == (2, 4)
    assert plan_parallelism(7, cpu) == (2, 3)
    assert plan_parallelism(8, cuda) == (1, 8)
    assert plan_parallelism(8, cpu, 4) == (4, 2)
    assert plan_parallelism(2, cpu, 1) == (1, 2)
    assert plan_parallelism(2, cpu, 3) == (3, 1)
