"""The engine core works per batch: a front's requests reach the batcher as items with the front as
their sink (no task, future or timer per request), a batch's answers leave as one `Dones` per front,
deadlines are swept per batcher, and a cancelled request is never answered while the engine may
still read its blocks. End to end (front processes, drain, crashes) in tests/test_workers.py,
tests/test_drain.py and the `engine-process` cases of the fault and lifecycle tests."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np

from quicknet.serve import messages as m
from quicknet.serve.batcher import Batcher, Item
from quicknet.serve.config import Settings
from quicknet.serve.engine import LocalModel
from quicknet.serve.errors import DeadlineExceeded, QueueFull, from_wire
from quicknet.serve.ipc import BLOCK_IMAGES, EngineServer, FrontLink, Ring
from quicknet.serve.model import ModelInfo, Statistics
from quicknet.serve.sources.remote import EngineClient


class Outbox:
    def __init__(self) -> None:
        self.sent: list[object] = []

    def send(self, message: object) -> None:
        self.sent.append(message)

    def of(self, kind: type) -> list:
        return [x for x in self.sent if isinstance(x, kind)]


def _logits(images: np.ndarray) -> np.ndarray:
    """A fake engine whose logits say which image they came from (its first pixel)."""
    return np.repeat(images[:, 0, 0, :1].astype(np.float32), 10, axis=1)


class HeldEngine:
    """A fake engine that holds every batch until `release` is set; `computed` lists the images
    it was given (their first pixel) and `started` is set when the first batch arrives."""

    def __init__(self) -> None:
        self.release, self.started = threading.Event(), threading.Event()
        self.computed: list[int] = []

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.computed.extend(images[:, 0, 0, 0].tolist())
        self.started.set()
        self.release.wait(5)
        return _logits(images)


def _link(blocks: int = 64) -> tuple[FrontLink, Outbox]:
    outbox = Outbox()
    return FrontLink(outbox, Ring.create(blocks * BLOCK_IMAGES), pid=1), outbox


def _items(link: FrontLink, ids: range, deadline: float, stats: Statistics | None = None) -> list[Item]:
    items = []
    stats = stats or Statistics()
    for request_id in ids:
        block = request_id
        link.ring.pixels[block, 0] = request_id  # the image says who it is
        ticket = (request_id, (block,), stats)
        item = Item(link.ring.images((block,), 1), deadline, None, "rest", sink=link, ticket=ticket)
        link.items[request_id] = item
        items.append(item)
    return items


def test_a_batch_of_requests_is_one_dones_per_front_with_logits_in_the_ring():
    async def main():
        batcher = Batcher(_logits, model="m", backend="fake", max_batch_size=64, max_queue_images=1000)
        batcher.start()
        link, outbox = _link()
        other, other_outbox = _link()
        tasks_before = len(asyncio.all_tasks())
        batcher.enqueue(_items(link, range(0, 20), time.monotonic() + 30))
        batcher.enqueue(_items(other, range(20, 30), time.monotonic() + 30))
        assert len(asyncio.all_tasks()) == tasks_before, "no task per request"
        for _ in range(200):
            await asyncio.sleep(0.005)
            if not link.items and not other.items:
                break
        await asyncio.sleep(0.01)  # the flush is scheduled after the batch
        await batcher.close()
        return link, outbox, other, other_outbox

    link, outbox, _, other_outbox = asyncio.run(main())
    (dones,) = outbox.of(m.Dones)
    (other_dones,) = other_outbox.of(m.Dones)
    assert sorted(dones.records["id"].tolist()) == list(range(20))
    assert sorted(other_dones.records["id"].tolist()) == list(range(20, 30))
    for request_id in range(20):
        assert link.ring.logits[request_id, 0, 0] == request_id, "each request's logits are in its own block"
    assert not outbox.of(m.Error) and not link.items


def test_a_deadline_is_answered_when_it_passes_not_when_the_next_batch_forms():
    slow = HeldEngine()

    async def main():
        batcher = Batcher(slow, model="m", backend="fake", max_batch_size=1, max_queue_images=1000)
        batcher.start()
        link, outbox = _link()
        batcher.enqueue(_items(link, range(0, 1), time.monotonic() + 30))  # holds the engine
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        batcher.enqueue(_items(link, range(1, 3), t0 + 0.2))
        while not outbox.of(m.Error) and time.monotonic() < t0 + 3:
            await asyncio.sleep(0.005)
        answered = time.monotonic() - t0
        slow.release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return outbox, answered

    outbox, answered = asyncio.run(main())
    errors = outbox.of(m.Error)
    assert sorted(e.id for e in errors) == [1, 2]
    assert all(isinstance(from_wire(e.kind, e.message, e.extra), DeadlineExceeded) for e in errors)
    assert answered < 2.0, "the sweep answered at the deadline, while the engine was still busy"
    assert slow.computed == [0], "expired requests were never computed"


def test_a_cancelled_request_is_answered_at_once_if_queued_and_after_its_batch_if_running():
    slow = HeldEngine()

    async def main():
        batcher = Batcher(slow, model="m", backend="fake", max_batch_size=1, max_queue_images=1000)
        batcher.start()
        link, outbox = _link()
        batcher.enqueue(_items(link, range(0, 2), time.monotonic() + 30))
        while not slow.started.is_set():
            await asyncio.sleep(0.005)
        link.cancel(0)  # running: its blocks may still be read
        link.cancel(1)  # queued
        answered_early = [e.id for e in outbox.of(m.Error)]
        slow.release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return outbox, answered_early

    outbox, answered_early = asyncio.run(main())
    assert answered_early == [1]
    assert sorted(e.id for e in outbox.of(m.Error)) == [0, 1] and not outbox.of(m.Dones)
    assert all(e.message == "cancelled" for e in outbox.of(m.Error))


def test_a_full_queue_refuses_the_items_past_it_with_retry_after():
    held = HeldEngine()

    async def main():
        batcher = Batcher(held, model="m", backend="fake", max_batch_size=1, max_queue_images=3)
        batcher.start()
        link, outbox = _link()
        batcher.enqueue(_items(link, range(0, 1), time.monotonic() + 30))  # taken: the engine holds it
        await asyncio.sleep(0.05)
        batcher.enqueue(_items(link, range(1, 6), time.monotonic() + 30))
        refused = list(outbox.of(m.Error))
        held.release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return refused, outbox

    refused, outbox = asyncio.run(main())
    assert [e.id for e in refused] == [4, 5]
    rebuilt = [from_wire(e.kind, e.message, e.extra) for e in refused]
    assert all(isinstance(e, QueueFull) and e.retry_after_s >= 1 and "Retry-After" in e.headers() for e in rebuilt)
    answered = [i for dones in outbox.of(m.Dones) for i in dones.records["id"].tolist()]
    assert sorted(answered) == [0, 1, 2, 3]


def _model(infer, max_batch_size: int, max_queue_images: int) -> LocalModel:
    """A served version as the engine process holds it (`LocalModel`), over a fake engine."""
    version = SimpleNamespace(name="m", version=1, labels=list("0123456789"), metadata={})
    backend = SimpleNamespace(infer=infer, name="fake", max_batch_size=max_batch_size, describe=dict)
    return LocalModel(version, backend, Settings(max_batch_size=max_batch_size, max_queue_images=max_queue_images))


class _Engine:
    def __init__(self, model: LocalModel):
        self.model = model

    def lookup(self, name: str, version: int):
        return self.model if (name, version) == ("m", 1) else None


INFO = ModelInfo("m", 1, tuple("0123456789"), {}, "fake", {}, 64)


def test_requests_cross_both_halves_as_one_message_each_way_and_come_back_with_their_logits():
    """A front's three requests (1, 20 and 1 images: the 20 span two ring blocks) leave as one
    Submits; the engine queues them without a task; one batch later one Dones brings every
    request its own logits, and the version's statistics count three successes."""

    async def main():
        runtime = type("Runtime", (), {})()
        client = EngineClient("unused", runtime, 64 * BLOCK_IMAGES)
        to_engine, to_front = Outbox(), Outbox()
        client.outbox = to_engine
        model = _model(_logits, 64, 1000)
        batcher = model.batcher
        batcher.start()
        server = EngineServer("unused", _Engine(model))
        link = FrontLink(to_front, Ring(client.ring.fd, client.ring.blocks), pid=1)
        sizes = (1, 20, 1)
        images = [np.full((n, 32, 32, 3), 10 * (i + 1), np.uint8) for i, n in enumerate(sizes)]
        for i, n in enumerate(sizes):
            images[i][:, 0, 0, 0] = np.arange(n) + 100 * i  # every image says which it is
        calls = [asyncio.create_task(client.submit(INFO, x, time.monotonic() + 30, "rest")) for x in images]
        await asyncio.sleep(0)  # the front's iteration ends: its flush runs
        await asyncio.sleep(0)
        (submits,) = to_engine.of(m.Submits)
        tasks_before = len(asyncio.all_tasks())
        server._submits(link, submits)
        assert len(asyncio.all_tasks()) == tasks_before, "no task per request in the engine"
        while not to_front.of(m.Dones):
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)
        for message in to_front.sent:
            client._dispatch[type(message)](message)
        results = await asyncio.gather(*calls)
        await batcher.close()
        return submits, to_front, results, images, model

    submits, to_front, results, images, model = asyncio.run(main())
    assert submits.records["n"].tolist() == [1, 20, 1] and submits.records["count"].tolist() == [1, 2, 1]
    (dones,) = to_front.of(m.Dones)
    assert len(dones.records) == 3 and not to_front.of(m.Error)
    for (logits, timing), x in zip(results, images, strict=True):
        assert np.array_equal(logits, _logits(x)), "each request gets its own images' logits back"
        assert timing.infer_s >= 0
    assert model.stats.success.count == 3 and model.stats.inference_count == 22


def test_refusals_count_as_failures_and_a_request_cancelled_while_running_not_as_a_success():
    held = HeldEngine()

    async def main():
        model = _model(held, 1, 2)
        batcher = model.batcher
        batcher.start()
        link, _ = _link()
        batcher.enqueue(_items(link, range(0, 1), time.monotonic() + 30, model.stats))  # taken
        await asyncio.sleep(0.05)
        link.cancel(0)
        batcher.enqueue(_items(link, range(1, 5), time.monotonic() + 30, model.stats))  # 2 queue, 2 refused
        held.release.set()
        await batcher.drain(5)
        await batcher.close()
        return model, link

    model, link = asyncio.run(main())
    assert model.stats.fail.count == 2, "the two refused (queue full)"
    assert model.stats.success.count == 2, "the two that queued; not the one cancelled while it ran"
    assert not link.items and not link.cancelled
