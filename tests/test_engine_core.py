"""The engine core works per batch: a front's requests reach the batcher as items with the front as
their sink (no task, future or timer per request), a batch's answers leave as one `Dones` per front,
deadlines are swept per batcher, and a cancelled request is never answered while the engine may
still read its blocks. End to end (front processes, drain, crashes) in tests/test_workers.py,
tests/test_drain.py and the `engine-process` cases of the fault and lifecycle tests."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from quicknet.serve import messages as m
from quicknet.serve.batcher import Batcher, Item
from quicknet.serve.errors import DeadlineExceeded, QueueFull, from_wire
from quicknet.serve.ipc import BLOCK_IMAGES, FrontLink, Ring


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


def _link(blocks: int = 64) -> tuple[FrontLink, Outbox]:
    outbox = Outbox()
    return FrontLink(outbox, Ring.create(blocks * BLOCK_IMAGES), pid=1), outbox


def _items(link: FrontLink, ids: range, deadline: float) -> list[Item]:
    items = []
    for request_id in ids:
        block = request_id
        link.ring.pixels[block, 0] = request_id  # the image says who it is
        item = Item(link.ring.images((block,), 1), deadline, None, "rest", sink=link, ticket=(request_id, (block,)))
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
    release = threading.Event()
    computed: list[int] = []

    def slow(images: np.ndarray) -> np.ndarray:
        computed.extend(images[:, 0, 0, 0].tolist())
        release.wait(5)
        return _logits(images)

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
        release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return outbox, answered

    outbox, answered = asyncio.run(main())
    errors = outbox.of(m.Error)
    assert sorted(e.id for e in errors) == [1, 2]
    assert all(isinstance(from_wire(e.kind, e.message, e.extra), DeadlineExceeded) for e in errors)
    assert answered < 2.0, "the sweep answered at the deadline, while the engine was still busy"
    assert computed == [0], "expired requests were never computed"


def test_a_cancelled_request_is_answered_at_once_if_queued_and_after_its_batch_if_running():
    release = threading.Event()
    started = threading.Event()

    def slow(images: np.ndarray) -> np.ndarray:
        started.set()
        release.wait(5)
        return _logits(images)

    async def main():
        batcher = Batcher(slow, model="m", backend="fake", max_batch_size=1, max_queue_images=1000)
        batcher.start()
        link, outbox = _link()
        batcher.enqueue(_items(link, range(0, 2), time.monotonic() + 30))
        while not started.is_set():
            await asyncio.sleep(0.005)
        link.cancel(0)  # running: its blocks may still be read
        link.cancel(1)  # queued
        answered_early = [e.id for e in outbox.of(m.Error)]
        release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return outbox, answered_early

    outbox, answered_early = asyncio.run(main())
    assert answered_early == [1]
    assert sorted(e.id for e in outbox.of(m.Error)) == [0, 1] and not outbox.of(m.Dones)
    assert all(e.message == "cancelled" for e in outbox.of(m.Error))


def test_a_full_queue_refuses_the_items_past_it_with_retry_after():
    release = threading.Event()

    def held(images: np.ndarray) -> np.ndarray:
        release.wait(5)
        return _logits(images)

    async def main():
        batcher = Batcher(held, model="m", backend="fake", max_batch_size=1, max_queue_images=3)
        batcher.start()
        link, outbox = _link()
        batcher.enqueue(_items(link, range(0, 1), time.monotonic() + 30))  # taken: the engine holds it
        await asyncio.sleep(0.05)
        batcher.enqueue(_items(link, range(1, 6), time.monotonic() + 30))
        refused = list(outbox.of(m.Error))
        release.set()
        await batcher.drain(5)
        await asyncio.sleep(0.01)
        await batcher.close()
        return refused, outbox

    refused, outbox = asyncio.run(main())
    assert [e.id for e in refused] == [4, 5]
    assert all(isinstance(from_wire(e.kind, e.message, e.extra), QueueFull) for e in refused)
    assert sorted(
        outbox.of(m.Dones)[0].records["id"].tolist()
        + [i for d in outbox.of(m.Dones)[1:] for i in d.records["id"].tolist()]
    ) == [0, 1, 2, 3]


@pytest.mark.parametrize("count", [1, 3])
def test_submits_and_dones_cross_the_wire_as_record_arrays(count):
    """The typed messages pickle and come back equal (what the socket carries)."""
    import pickle

    records = np.zeros(count, m.SUBMIT)
    records["id"] = range(count)
    records["n"] = 1
    submits = m.Submits("quicknet-xs", 3, "rest", records, np.arange(count, dtype=np.int32))
    again = pickle.loads(pickle.dumps(submits))
    assert (again.model, again.version, again.protocol) == ("quicknet-xs", 3, "rest")
    assert np.array_equal(again.records, records) and again.records.dtype == m.SUBMIT
