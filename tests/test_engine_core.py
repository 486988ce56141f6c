"""The engine core works per batch, from the fronts' shared memory: a front publishes a record in
its ring (no message, task or timer per request), a runner thread collects, batches, answers in
the ring and signals each front once a batch; the front rings the engine only while it is
parked; deadlines are the front's one timer, cancellations a flag in the record, and a block is
never reused before the engine answered it. Both halves run here for real in one process (the
engine's runners are threads either way). End to end (front processes, drain, crashes) in
tests/test_workers.py, tests/test_drain.py, tests/test_service.py (the hung server's deadline and
cancel cases) and the `engine-process` cases of the fault and lifecycle tests."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from quicknet.serve import engine_core, ipc, metrics
from quicknet.serve import messages as m
from quicknet.serve.engine_core import EngineCore, Front
from quicknet.serve.errors import DeadlineExceeded, EngineFailure, QueueFull, from_wire, to_wire
from quicknet.serve.ipc import BLOCK_IMAGES, Ring
from quicknet.serve.model import ModelInfo, Statistics
from quicknet.serve.sources import remote
from quicknet.serve.sources.remote import EngineClient, RemoteModel


def _logits(images: np.ndarray) -> np.ndarray:
    """A fake engine whose logits say which image they came from (its first pixel)."""
    return np.repeat(images[:, 0, 0, :1].astype(np.float32), 10, axis=1)


class HeldEngine:
    """A fake engine that holds every batch until `release` is set; `computed` lists the images
    it was given (their first pixel) and `started` is set when the first batch arrives."""

    def __init__(self) -> None:
        self.release, self.started = threading.Event(), threading.Event()
        self.computed: list[int] = []
        self.batches: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.computed.extend(images[:, 0, 0, 0].tolist())
        self.batches.append(len(images))
        self.started.set()
        self.release.wait(5)
        return _logits(images)


class Rig:
    """One engine core with one lane and one front (an `EngineClient` over its own ring), wired as
    the engine process wires them, minus the socket: `Failed` messages are handed over directly."""

    def __init__(self, infer, *, max_batch_size=64, max_queue_images=1000, preferred=(), ring_images=1024, instances=1):
        self.core = EngineCore()
        self.stats = Statistics()
        self.lane = self.core.lane(
            infer,
            model="m",
            backend="fake",
            max_batch_size=max_batch_size,
            max_queue_images=max_queue_images,
            preferred_batch_sizes=preferred,
            instances=instances,
            stats=self.stats,
        )
        self.client = EngineClient("unused", type("Runtime", (), {})(), ring_images)
        self.client.outbox = object()  # connected (the socket is not used by requests)
        self.signals = 0  # the engine's signals to this front (its writes to the front's bell)
        self.rung = 0  # the front's doorbell writes
        self.failed: list[m.Failed] = []
        info = ModelInfo("m", 1, tuple("0123456789"), {}, "fake", {}, max_batch_size)
        self.model = RemoteModel(info, self.client, self.lane.key, self.client.session)

    async def __aenter__(self) -> Rig:
        loop = asyncio.get_running_loop()
        rig = self

        def fail(blocks, refusal):
            message = m.Failed(blocks, *to_wire(refusal))
            rig.failed.append(message)
            loop.call_soon_threadsafe(rig.client._on_failed, message)

        class CountingOs:  # the engine core's `os`: its writes to this front's bell are counted
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def eventfd_write(fd, value):
                if fd == rig.client.bell:
                    rig.signals += 1
                return os.eventfd_write(fd, value)

        engine_core.os = CountingOs()
        ring = Ring(self.client.ring.fd, self.client.ring.blocks)
        self.front = Front(ring, self.client.doorbell, self.client.bell, os.getpid(), fail)
        self.core.add_front(self.front)
        loop.add_reader(self.client.bell, self.client._on_bell)
        self.lane.start()
        return self

    async def __aexit__(self, *exc) -> None:
        asyncio.get_running_loop().remove_reader(self.client.bell)
        await self.lane.close()
        engine_core.os = os

    def submit(self, images: np.ndarray, timeout_s: float = 30) -> asyncio.Task:
        return asyncio.ensure_future(self.model.submit(images, time.monotonic() + timeout_s, "rest"))

    async def settle(self, timeout_s: float = 5) -> None:
        """Until every block is back with the front."""
        deadline = time.monotonic() + timeout_s
        while self.client.owner and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert not self.client.owner and len(self.client.ring.free) == self.client.ring.blocks


def _images(*sizes: int) -> list[np.ndarray]:
    out = []
    for i, n in enumerate(sizes):
        x = np.full((n, 32, 32, 3), 7, np.uint8)
        x[:, 0, 0, 0] = (np.arange(n) + 50 * i) % 256  # every image says which it is
        out.append(x)
    return out


@pytest.fixture
def doorbells(monkeypatch):
    """Counts the front's doorbell writes (the wrapped `os.eventfd_write` is the front module's)."""
    writes: list[int] = []
    real = os.eventfd_write

    class Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def eventfd_write(fd, value):
            writes.append(fd)
            return real(fd, value)

    monkeypatch.setattr(remote, "os", Os())
    return writes


def test_requests_cross_in_shared_memory_and_come_back_with_their_own_logits():
    """Requests of 1, 20 (two blocks: two records), 1 and 3 images: every one gets its own
    images' logits back, no message crosses the socket, the engine signals the front once a
    batch, and the statistics count four requests and 25 images."""

    async def main():
        async with Rig(_logits) as rig:
            images = _images(1, 20, 1, 3)
            tasks_before = len(asyncio.all_tasks())
            calls = [rig.submit(x) for x in images]
            await asyncio.sleep(0)  # every call has run up to its wait for the engine
            assert len(asyncio.all_tasks()) == tasks_before + len(calls), "no task of the front's own per request"
            results = await asyncio.gather(*calls)
            await rig.settle()
            return rig, images, results

    rig, images, results = asyncio.run(main())
    for (logits, timing), x in zip(results, images, strict=True):
        assert np.array_equal(logits, _logits(x)), "each request gets its own images' logits back"
        assert timing.infer_s >= 0 and timing.queue_s >= 0
    assert not rig.failed
    assert rig.signals == rig.stats.execution_count, "one signal per front per batch"
    assert rig.stats.success.count == 4 and rig.stats.inference_count == 25, "a split request counts once"


def test_the_front_rings_the_doorbell_only_while_the_engine_is_parked(doorbells):
    held = HeldEngine()

    async def main():
        async with Rig(held) as rig:
            while rig.core.parked == 0:  # the runner parks: the front must ring for the first request
                await asyncio.sleep(0.005)
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            rung_while_parked = doorbells.count(rig.client.doorbell)
            more = [rig.submit(x) for x in _images(1, 1, 1, 1, 1)]  # the runner is busy: nobody rings
            await asyncio.sleep(0.05)
            rung_while_busy = doorbells.count(rig.client.doorbell) - rung_while_parked
            held.release.set()
            await asyncio.gather(first, *more)
            await rig.settle()
            return rung_while_parked, rung_while_busy, held.batches

    rung_while_parked, rung_while_busy, batches = asyncio.run(main())
    assert rung_while_parked == 1
    assert rung_while_busy == 0, "the front rang while the engine was running a batch"
    assert batches == [1, 5], "the busy runner found the five records itself, as one batch"


def test_a_queued_request_hears_its_deadline_when_it_passes_and_is_never_computed():
    held = HeldEngine()

    async def main():
        async with Rig(held, max_batch_size=1) as rig:
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            t0 = time.monotonic()
            later = rig.submit(_images(1, 1, 1)[2], timeout_s=0.4)
            late = rig.submit(_images(1, 1)[1], timeout_s=0.1)
            answered = []
            for call in (late, later):
                with pytest.raises(DeadlineExceeded, match="while queued"):
                    await call
                answered.append(time.monotonic() - t0)
            held.release.set()
            await first
            await rig.settle()
            return answered, rig

    answered, rig = asyncio.run(main())
    assert answered[0] < 0.35 <= answered[1] < 1.5, f"each answered at its own deadline: {answered}"
    assert held.computed == [0], "the expired requests were never computed"
    assert rig.stats.fail.count == 0, "the front's own timer answered them; the engine saw cancelled records"


def test_a_request_running_at_its_deadline_is_answered_by_its_batch():
    held = HeldEngine()

    async def main():
        async with Rig(held) as rig:
            call = rig.submit(_images(1)[0], timeout_s=1.0)  # time enough to reach the engine on a busy box
            await asyncio.to_thread(held.started.wait, 5)
            await asyncio.sleep(1.2)  # past its deadline, in the engine
            held.release.set()
            logits, _ = await call
            await rig.settle()
            return logits

    assert asyncio.run(main()).shape == (1, 10)


def test_a_cancelled_request_is_skipped_if_queued_and_its_blocks_return_only_with_the_answer():
    held = HeldEngine()

    async def main():
        async with Rig(held, max_batch_size=1) as rig:
            running = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            queued = rig.submit(_images(1, 1)[1])
            await asyncio.sleep(0.02)
            queued.cancel()
            running.cancel()
            await asyncio.sleep(0.02)
            held_blocks = len(rig.client.owner)  # both still with the engine: neither block reusable
            held.release.set()
            await rig.settle()
            return held_blocks

    assert asyncio.run(main()) == 2
    assert held.computed == [0], "the queued one was skipped; the running one ran"


def test_a_full_queue_refuses_the_records_past_it_with_retry_after():
    held = HeldEngine()

    async def main():
        async with Rig(held, max_batch_size=1, max_queue_images=2) as rig:
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            rest = [rig.submit(x) for x in _images(1, 1, 1, 1)]
            await asyncio.sleep(0.05)
            held.release.set()
            outcomes = await asyncio.gather(*rest, return_exceptions=True)
            await first
            await rig.settle()
            return outcomes, rig

    outcomes, rig = asyncio.run(main())
    refused = [o for o in outcomes if isinstance(o, QueueFull)]
    assert len(refused) == 2 and all(float(r.retry_after_s) >= 1 for r in refused)
    assert sum(isinstance(o, tuple) for o in outcomes) == 2
    assert rig.stats.fail.count == 2 and rig.stats.success.count == 3


def test_an_engine_failure_reaches_every_request_of_its_batch_with_its_reason():
    def broken(images):
        raise RuntimeError("out of device memory")

    async def main():
        async with Rig(broken) as rig:
            outcomes = await asyncio.gather(*(rig.submit(x) for x in _images(1, 20)), return_exceptions=True)
            await rig.settle()
            return outcomes, rig

    outcomes, rig = asyncio.run(main())
    assert all(isinstance(o, EngineFailure) and "out of device memory" in str(o) for o in outcomes)
    assert rig.failed and all(isinstance(from_wire(f.kind, f.message, f.extra), EngineFailure) for f in rig.failed)
    assert rig.stats.fail.count == 2 and rig.stats.success.count == 0, "two requests failed (one in two parts)"


def test_a_runner_survives_a_wrong_answer_from_the_engine_and_serves_the_next_batch():
    """Logits of the wrong shape fail that batch's requests with the reason (not a dead runner
    whose requests wait forever); the next batch is served."""
    calls = []

    def sometimes_wrong(images):
        calls.append(len(images))
        return np.zeros((len(images), 9 if len(calls) == 1 else 10), np.float32)

    async def main():
        async with Rig(sometimes_wrong) as rig:
            with pytest.raises(EngineFailure, match="shape"):
                await rig.submit(_images(1)[0])
            logits, _ = await rig.submit(_images(1)[0])
            await rig.settle()
            return logits, rig.lane._threads[0].is_alive()

    logits, alive = asyncio.run(main())
    assert logits.shape == (1, 10) and alive


def test_batches_respect_the_maximum_and_the_preferred_sizes_with_whole_records():
    held = HeldEngine()
    held.release.set()

    async def main():
        async with Rig(held, max_batch_size=8, preferred=(4,)) as rig:
            gate = threading.Event()
            original = rig.lane._infer
            rig.lane._infer = lambda x: (gate.wait(5), original(x))[1]  # hold the first batch
            calls = [rig.submit(x) for x in _images(1)]
            while not held.batches and not rig.lane.running:
                await asyncio.sleep(0.005)
            calls += [rig.submit(x) for x in _images(3, 2, 2, 1, 1, 5)]
            await asyncio.sleep(0.05)
            gate.set()
            await asyncio.gather(*calls)
            await rig.settle()

    asyncio.run(main())
    assert held.batches[0] == 1
    assert all(size <= 8 for size in held.batches) and sum(held.batches) == 15
    assert 4 in held.batches[1:], "a batch of 7 queued images was trimmed to the preferred 4"


def test_a_gone_front_is_never_answered_and_its_queued_records_are_dropped():
    held = HeldEngine()

    async def main():
        async with Rig(held, max_batch_size=1) as rig:
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            second = rig.submit(_images(1, 1)[1])
            await asyncio.sleep(0.02)
            block = next(iter(rig.client.owner))  # the running request's
            rig.core.remove_front(rig.front)
            signals = rig.signals
            held.release.set()
            await asyncio.sleep(0.1)
            pending = not first.done()
            status, logits = int(rig.client.ring.answers["status"][block]), rig.client.ring.logits[block, 0].copy()
            first.cancel()
            second.cancel()
            return rig, signals, pending, status, logits

    rig, signals, pending, status, logits = asyncio.run(main())
    assert rig.lane.queued_images == 0 and not rig.core.fronts
    assert held.computed == [0], "the gone front's queued record was not computed"
    assert pending and rig.signals == signals, "the running batch's answer never reached the gone front"
    assert status == ipc.RUNNING and not logits.any(), "nor did its logits or its answer reach the ring"


def test_without_in_order_stores_every_publication_rings_with_its_count(monkeypatch, doorbells):
    """Where stores may be seen out of order (not x86-64), the tail travels in the doorbell."""
    monkeypatch.setattr(remote, "TAIL_IN_MEMORY", False)
    monkeypatch.setattr(engine_core, "TAIL_IN_MEMORY", False)

    async def main():
        async with Rig(_logits) as rig:
            images = _images(1, 20, 2)
            results = await asyncio.gather(*(rig.submit(x) for x in images))
            await rig.settle()
            return rig, images, results

    rig, images, results = asyncio.run(main())
    for (logits, _), x in zip(results, images, strict=True):
        assert np.array_equal(logits, _logits(x))
    assert doorbells.count(rig.client.doorbell) == 3, "one ring per publication, parked or not"
    assert rig.client.ring.sub_tail == 0, "the tail never went through memory"


def test_waiting_images_counts_records_not_yet_collected():
    held = HeldEngine()

    async def main():
        async with Rig(held, max_batch_size=1) as rig:
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            rest = [rig.submit(x) for x in _images(3, 2)]
            await asyncio.sleep(0.02)
            waiting = rig.core.waiting_images()
            held.release.set()
            await asyncio.gather(first, *rest)
            await rig.settle()
            return waiting, rig.lane.key

    waiting, key = asyncio.run(main())
    assert waiting == {key: 5}, "the busy runner has not collected them; they are still counted"


def test_observe_many_is_observe_value_by_value():
    registry = CollectorRegistry()
    one = Histogram("one", "", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    many = Histogram("many", "", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    values = np.array([0.0, 0.0005, 0.0007, 0.001, 0.3, 2.5, 99.0])
    for v in values:
        one.observe(float(v))
    metrics.observe_many(many, values)

    def samples(histogram, name):
        return [
            (s.name.replace(name, "x"), s.labels, s.value)
            for s in histogram.collect()[0].samples
            if not s.name.endswith("_created")
        ]

    assert samples(one, "one") == samples(many, "many")
    assert samples(many, "many")[-2:] == [("x_count", {}, 7.0), ("x_sum", {}, pytest.approx(values.sum()))]


def test_a_ring_lays_out_every_part_apart_and_resets_for_a_new_engine():
    ring = Ring.create(5 * BLOCK_IMAGES)
    parts = [ring.control, ring.sub, ring.comp, ring.requests, ring.answers, ring.pixels, ring.logits]
    spans = sorted((p.ctypes.data, p.ctypes.data + p.nbytes) for p in parts)
    assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans)), "no two parts overlap"
    assert spans[-1][1] - spans[0][0] <= len(ring.memory)
    ring.sub_tail, ring.engine_idle = 7, True
    ring.free.clear()
    ring.reset()
    assert (ring.sub_tail, ring.engine_idle, len(ring.free)) == (0, False, 5)
    assert ipc.refusal_for(ipc.QUEUE_FULL, 2.0, "m", 1).retry_after_s == 2.0


def test_the_engine_core_alone_benchmark_runs_and_a_batch_divides_its_cost():
    from benchmarks.engine_core import core_alone

    rows = core_alone([1, 64], rounds=30)
    assert [r["batch"] for r in rows] == [1, 64]
    assert all(r["collect_us"] > 0 and r["take_us"] > 0 and r["execute_us"] > 0 for r in rows)
    assert rows[1]["request_us"] < rows[0]["request_us"], "per-batch work is shared by the batch's requests"


def test_a_repository_change_is_answered_once_every_front_serves_the_new_state():
    """A load or unload through one front answers once every connected front has said `Seen` for
    the state that followed it; a front that leaves meanwhile is not waited for; a new front's
    first state is not a new generation (the others would never see it)."""
    from quicknet.serve.engine_server import EngineServer

    class Engine:
        def __init__(self) -> None:
            self.models: list = []
            self.default_name = "m"
            self.server: EngineServer | None = None

        async def load_model(self, name: str) -> None:  # the engine's change, told to every front
            self.server.publish()

    class Box:
        def __init__(self) -> None:
            self.sent: list = []

        def send(self, message) -> None:
            self.sent.append(message)

    async def main():
        server = EngineServer("unused", Engine(), EngineCore())
        a, b = Box(), Box()
        server.outboxes = {a, b}
        server.publish()
        assert [x.generation for x in a.sent + b.sent] == [1, 1]
        waiting = asyncio.ensure_future(server._fronts_serve_current_state())
        await asyncio.sleep(0.02)
        server._on_seen(a, 1)
        await asyncio.sleep(0.02)
        first = waiting.done()
        server._on_seen(b, 1)
        await asyncio.sleep(0.02)
        second = waiting.done()
        server.publish()
        waiting = asyncio.ensure_future(server._fronts_serve_current_state())
        server._on_seen(a, 2)
        await asyncio.sleep(0.02)
        before_leaving = waiting.done()
        server._on_gone(b)
        await asyncio.sleep(0.02)
        after_leaving = waiting.done()
        # the repository call itself: its Result leaves only once the remaining front serves the load
        engine = server.engine
        engine.server = server
        caller = Box()
        call = asyncio.ensure_future(server._repository_call(caller, m.Load(7, "m")))
        await asyncio.sleep(0.02)
        answered_early = bool(caller.sent)
        server._on_seen(a, server.generation)
        await asyncio.sleep(0.02)
        await call
        (result,) = caller.sent
        return first, second, before_leaving, after_leaving, server._state().generation, answered_early, result

    first, second, before_leaving, after_leaving, generation, answered_early, result = asyncio.run(main())
    assert not answered_early and isinstance(result, m.Result) and result.id == 7
    assert (first, second) == (False, True), "answered once both fronts serve the new state"
    assert (before_leaving, after_leaving) == (False, True), "a front that left is not waited for"
    assert generation == 3, "a new front's first state is the current generation (two publishes, one load)"


def test_one_signal_per_front_per_batch_when_a_batch_holds_several_of_its_chunks():
    """Two chunks of one front (records collected at two looks) in one batch: one bell write."""

    async def main():
        async with Rig(_logits) as rig:
            await rig.lane.close()  # no runner: the batch is run here, by hand
            ring, now = rig.front.ring, time.monotonic()
            blocks = np.array([0, 1, 2], np.int32)
            records = np.array([(i, now + 30, rig.lane.key, 1, 0, 0, 0) for i in range(3)], ipc.REQUEST)
            ring.pixels[blocks, 0, 0, 0, 0] = np.arange(3) + 40  # each image's first pixel says which it is
            for block in blocks.tolist():
                rig.client.ring.free.remove(block)
            chunks = [
                engine_core.Chunk(rig.front, blocks[:2], records[:2], now),
                engine_core.Chunk(rig.front, blocks[2:], records[2:], now),
            ]
            before = rig.signals
            rig.lane._execute(chunks)
            signals = rig.signals - before
            count = os.eventfd_read(rig.client.bell)
            return signals, count, ring.logits[blocks, 0, 0].tolist(), ring.answers["status"][blocks].tolist()

    signals, count, logits, statuses = asyncio.run(main())
    assert signals == 1 and count == 3, "one signal for the front, counting its three answers"
    assert logits == [40.0, 41.0, 42.0] and statuses == [ipc.OK] * 3


def test_a_request_still_running_long_past_its_deadline_is_answered_504():
    """A batch that does not come back (a hung engine): the request is given RUNNING_GRACE_S past
    its deadline, then answered 504; its block returns with the engine's answer, whenever."""
    held = HeldEngine()

    async def main():
        async with Rig(held) as rig:
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="while running"):
                await rig.submit(_images(1)[0], timeout_s=0.3)
            waited = time.monotonic() - t0
            still_out = len(rig.client.owner)
            held.release.set()
            await rig.settle()
            return waited, still_out

    waited, still_out = asyncio.run(main())
    assert remote.RUNNING_GRACE_S + 0.3 <= waited < remote.RUNNING_GRACE_S + 2, waited
    assert still_out == 1, "its block stayed out until the engine answered"


def test_the_engine_process_batches_as_the_one_process_batcher_does():
    """One policy, two implementations (`batcher.py` for one process, the engine core's lane):
    the same requests, queued behind a held batch, form the same batches."""
    from quicknet.serve.batcher import Batcher

    sizes = (1, 3, 2, 2, 1, 5, 4, 1)

    async def one_process() -> list[int]:
        held = HeldEngine()
        batcher = Batcher(
            held, model="m", backend="fake", max_batch_size=8, max_queue_images=1000, preferred_batch_sizes=(4, 8)
        )
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(_images(1)[0], time.monotonic() + 30, "rest"))
        await asyncio.to_thread(held.started.wait, 5)
        rest = [asyncio.ensure_future(batcher.submit(x, time.monotonic() + 30, "rest")) for x in _images(*sizes)]
        await asyncio.sleep(0.05)
        held.release.set()
        await asyncio.gather(first, *rest)
        await batcher.close()
        return held.batches

    async def engine_process() -> list[int]:
        held = HeldEngine()
        async with Rig(held, max_batch_size=8, preferred=(4, 8)) as rig:
            first = rig.submit(_images(1)[0])
            await asyncio.to_thread(held.started.wait, 5)
            rest = [rig.submit(x) for x in _images(*sizes)]
            await asyncio.sleep(0.05)
            held.release.set()
            await asyncio.gather(first, *rest)
            await rig.settle()
        return held.batches

    one, engine = asyncio.run(one_process()), asyncio.run(engine_process())
    # 8: 1+3+2+2; then 1+5 = 6 trimmed to a preferred size (4): 1; 5 alone; 4+1 trimmed: 4; then 1
    assert one == engine == [1, 8, 1, 5, 4, 1]


def test_a_model_from_an_earlier_engine_session_is_refused_not_sent_with_a_stale_key():
    """After the engine restarted, a handler still holding the old session's model gets 503: its
    key may name another version in the new engine."""
    from quicknet.serve.errors import NotAccepting

    async def main():
        async with Rig(_logits) as rig:
            rig.client.session += 1  # the front reconnected to a new engine
            with pytest.raises(NotAccepting, match="not connected"):
                await rig.submit(_images(1)[0])
            return len(rig.client.ring.free) == rig.client.ring.blocks

    assert asyncio.run(main()), "nothing was published"
