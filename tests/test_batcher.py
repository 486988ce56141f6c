from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from quicknet.serve.batcher import Batcher
from quicknet.serve.errors import DeadlineExceeded, NotAccepting, QueueFull


class SlowEngine:
    """Records every batch it computes; each call takes `delay` seconds."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(batch.copy())
        return np.repeat(batch[:, :1, 0, 0].astype(np.float32), 10, axis=1)


def images(n: int, value: int = 0) -> np.ndarray:
    return np.full((n, 32, 32, 3), value, np.uint8)


def make(engine: SlowEngine, **kw) -> Batcher:
    opts = {"model": "m", "backend": "fake", "max_batch_size": 8, "max_queue_images": 64, **kw}
    return Batcher(engine, **opts)


def far() -> float:
    return time.monotonic() + 30


def run(coro):
    return asyncio.run(coro)


def test_results_come_back_in_order_and_requests_share_batches():
    async def main():
        engine = SlowEngine()
        engine.gate.clear()
        b = make(engine)
        b.start()
        tasks = [asyncio.create_task(b.submit(images(1, v), far(), "t")) for v in range(6)]
        await asyncio.sleep(0.05)
        engine.gate.set()
        results = await asyncio.gather(*tasks)
        await b.close()
        return engine, results

    engine, results = run(main())
    assert [int(r[0][0, 0]) for r in results] == list(range(6))
    assert len(engine.batches) < 6


def test_request_larger_than_max_batch_is_split_and_reassembled():
    async def main():
        engine = SlowEngine()
        b = make(engine, max_batch_size=4)
        b.start()
        pixels = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
        logits, _ = await b.submit(pixels, far(), "t")
        await b.close()
        return engine, logits

    engine, logits = run(main())
    assert [len(x) for x in engine.batches] == [4, 4, 2]
    assert logits[:, 0].tolist() == list(range(10))


def test_expired_items_are_dropped_before_compute():
    async def main():
        engine = SlowEngine()
        engine.gate.clear()
        b = make(engine, max_batch_size=1)
        b.start()
        blocker = asyncio.create_task(b.submit(images(1, 1), far(), "t"))
        await asyncio.sleep(0.02)  # the blocker is now on the engine
        doomed = asyncio.create_task(b.submit(images(1, 2), time.monotonic() + 0.05, "t"))
        await asyncio.sleep(0.1)  # its deadline passes while it waits in the queue
        engine.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await doomed
        await b.close()
        return engine

    engine = run(main())
    assert all(int(batch[0, 0, 0, 0]) != 2 for batch in engine.batches), "an expired item was computed"


def test_cancelled_requests_leave_the_queue():
    async def main():
        engine = SlowEngine()
        engine.gate.clear()
        b = make(engine, max_batch_size=1)
        b.start()
        blocker = asyncio.create_task(b.submit(images(1, 1), far(), "t"))
        await asyncio.sleep(0.02)
        gone = asyncio.create_task(b.submit(images(1, 3), far(), "t"))
        await asyncio.sleep(0.02)
        gone.cancel()
        await asyncio.sleep(0.01)
        engine.gate.set()
        await blocker
        await b.drain(5)
        await b.close()
        return engine

    engine = run(main())
    assert [int(x[0, 0, 0, 0]) for x in engine.batches] == [1]


def test_full_queue_refuses_at_once_then_recovers():
    async def main():
        engine = SlowEngine()
        engine.gate.clear()
        b = make(engine, max_batch_size=4, max_queue_images=8)
        b.start()
        running = asyncio.create_task(b.submit(images(4), far(), "t"))
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(b.submit(images(8), far(), "t"))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as err:
            await b.submit(images(1), far(), "t")
        assert err.value.retry_after_s >= 1
        with pytest.raises(QueueFull):
            b.admit()  # the early check a front makes before reading a request's body
        engine.gate.set()
        await asyncio.gather(running, queued)
        b.admit()
        await b.submit(images(1), far(), "t")
        await b.close()

    run(main())


def test_preferred_batch_sizes_trim_a_batch():
    async def main():
        engine = SlowEngine()
        engine.gate.clear()
        b = make(engine, max_batch_size=8, preferred_batch_sizes=(4, 8))
        b.start()
        first = asyncio.create_task(b.submit(images(1), far(), "t"))
        await asyncio.sleep(0.02)
        rest = [asyncio.create_task(b.submit(images(1), far(), "t")) for _ in range(6)]
        await asyncio.sleep(0.02)
        engine.gate.set()
        await asyncio.gather(first, *rest)
        await b.close()
        return engine

    engine = run(main())
    assert [len(x) for x in engine.batches] == [1, 4, 2]


def test_queue_delay_waits_for_a_fuller_batch():
    """Ordered by event-loop steps, not wall time: with a long queue delay the first request waits
    while four more arrive one loop step apart, and the batch leaves the moment it is full."""

    async def main():
        engine = SlowEngine()
        b = make(engine, max_batch_size=5, max_queue_delay_s=30)
        b.start()
        tasks = []
        for _ in range(5):
            tasks.append(asyncio.create_task(b.submit(images(1), far(), "t")))
            for _ in range(3):
                await asyncio.sleep(0)  # let the worker run: it must keep waiting, not dispatch one image
        await asyncio.wait_for(asyncio.gather(*tasks), 10)  # a full batch does not wait out the 30 s
        await b.close()
        return engine

    engine = run(main())
    assert [len(x) for x in engine.batches] == [5]


def test_queue_delay_sends_a_partial_batch_when_it_expires():
    async def main():
        engine = SlowEngine()
        b = make(engine, max_batch_size=8, max_queue_delay_s=0.05)
        b.start()
        await asyncio.gather(*(b.submit(images(1), far(), "t") for _ in range(2)))
        await b.close()
        return engine

    assert [len(x) for x in run(main()).batches] == [2]


def test_drain_finishes_queued_work_and_refuses_new():
    async def main():
        engine = SlowEngine(delay=0.02)
        b = make(engine, max_batch_size=2)
        b.start()
        tasks = [asyncio.create_task(b.submit(images(2), far(), "t")) for _ in range(5)]
        await asyncio.sleep(0)
        assert await b.drain(10)
        with pytest.raises(NotAccepting):
            await b.submit(images(1), far(), "t")
        results = await asyncio.gather(*tasks)
        await b.close()
        return results

    assert len(run(main())) == 5


def test_engine_failure_reaches_every_caller():
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("device lost")

    async def main():
        b = Batcher(broken, model="m", backend="fake", max_batch_size=8, max_queue_images=8)
        b.start()
        with pytest.raises(RuntimeError, match="device lost"):
            await b.submit(images(2), far(), "t")
        await b.close()

    run(main())


def test_one_batch_policy_for_both_batchers():
    """`BatchPolicy` keeps only preferred sizes up to the maximum, names the size a batch is cut
    back to, and the Retry-After of a full queue; both batchers read it (and refuse a setting
    it does not have)."""
    from quicknet.serve.batcher import BatchPolicy
    from quicknet.serve.engine_core import EngineCore
    from quicknet.serve.model import Statistics

    policy = BatchPolicy(max_batch_size=8, max_queue_images=64, preferred_batch_sizes=(16, 8, 4), instances=2)
    assert policy.preferred_batch_sizes == (4, 8)
    assert policy.trim_to(6, requests=3) == 4 and policy.trim_to(8, requests=3) is None
    assert policy.trim_to(6, requests=1) is None and policy.trim_to(3, requests=2) is None
    assert policy.retry_after(0, 0.05) == 1.0 and policy.retry_after(1600, 0.05) == 5.0
    batcher = make(SlowEngine(), preferred_batch_sizes=(16, 8, 4))
    lane = EngineCore().lane(lambda x: x, model="m", backend="fake", stats=Statistics(), max_batch_size=8,
                             max_queue_images=64, preferred_batch_sizes=(16, 8, 4))  # fmt: skip
    assert batcher.preferred == lane.preferred == (4, 8) and batcher.max_batch_size == lane.max_batch_size == 8
    with pytest.raises(TypeError):
        make(SlowEngine(), max_batch=8)
