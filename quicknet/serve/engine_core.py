"""The engine process's batcher: requests read from the fronts' shared memory, batched per model
version on threads of its own, answered per batch (as vLLM's engine core and Triton's C++
batcher work). The event loop of the engine process takes no part in a request.

    front: record -> block, block -> submission queue, ring the doorbell only if the engine is parked
    runner (a thread per engine instance of a version):
        collect every front's new records (numpy, per front) -> the versions' queues
        take a batch: drop cancelled and expired records, cut at max_batch_size, trim to a
            preferred size -> gather the pixels (one fancy index per front) -> the engine
        -> logits into the fronts' blocks, the answers into their records, the blocks into each
           front's completion queue and one signal per front per batch; metrics and statistics
           once per batch
        nothing to do: park on every front's doorbell and the version's own wake-up

What a record costs the engine is a few numpy element operations; the rest is per batch. Refusals
that need no words (deadline, cancelled, queue full, draining, unknown version) are answer
statuses in the record; an engine failure's reason travels over the socket (`messages.Failed`).
Every published record is answered exactly once, and a front reuses a block only after its
answer, so a block is never read or written for two requests. The one-process server keeps
the asyncio batcher (`batcher.py`): the same policy, one process, no shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quicknet.serve import metrics
from quicknet.serve.batcher import BatchPolicy, FollowsPolicy
from quicknet.serve.errors import EngineFailure, Refusal
from quicknet.serve.ipc import (
    ANSWER,
    CANCELLED,
    DEADLINE,
    NOT_ACCEPTING,
    NOT_FOUND,
    OK,
    PROTOCOLS,
    QUEUE_FULL,
    RUNNING,
    TAIL_IN_MEMORY,
    Ring,
    fence,
)
from quicknet.serve.model import Statistics

log = logging.getLogger("quicknet.engine_core")

PARKED_WAIT_S = 0.05  # a parked runner looks anyway this often: a safety net, never the mechanism


class Front:
    """One connected front process, on the engine's side: its ring, its doorbell (front -> engine)
    and its bell (engine -> front), and where the engine has read its submission queue to."""

    def __init__(self, ring: Ring, doorbell: int, bell: int, pid: int, fail: Callable[[list[int], Refusal], None]):
        self.ring = ring
        self.doorbell = doorbell
        self.bell = bell
        self.pid = pid
        self.fail = fail  # an engine failure's answer for these blocks, over the socket (any thread)
        self.head = 0  # submission queue: read up to here
        self.gone = False
        self._lock = threading.Lock()  # the completion queue: runners of several versions answer
        self._comp_tail = 0

    def new_blocks(self) -> np.ndarray | None:
        """Blocks published since the last look (the caller holds the core's lock)."""
        if TAIL_IN_MEMORY:
            tail = self.ring.sub_tail
        else:  # the count comes through the doorbell, which orders the front's stores before it
            try:
                tail = self.head + os.eventfd_read(self.doorbell)
            except BlockingIOError:
                return None
        if tail == self.head:
            return None
        blocks = self.ring.sub[self.ring.positions(self.head, tail - self.head)]
        self.head = tail
        return blocks

    def answer(self, blocks: np.ndarray, answers: np.ndarray, scatter: Callable[[], None] | None = None) -> None:
        """`scatter` (the logits into the blocks), the answers into the records, the blocks into the
        completion queue, one signal; nothing once the front is gone (its blocks may be another
        engine's by now). Any thread."""
        with self._lock:
            if self.gone:
                return
            if scatter is not None:
                scatter()
            self.ring.answers[blocks] = answers
            self.ring.comp[self.ring.positions(self._comp_tail, len(blocks))] = blocks
            self._comp_tail += len(blocks)
        with contextlib.suppress(OSError):  # the front closed its end: it is gone
            os.eventfd_write(self.bell, len(blocks))

    def answer_all(self, blocks: np.ndarray, status: int, retry_after: float = 0.0) -> None:
        answers = np.zeros(len(blocks), ANSWER)
        answers["status"] = status
        answers["retry_after"] = retry_after
        self.answer(blocks, answers)


@dataclass(slots=True)
class Chunk:
    """Records of one front for one version, in queue order (their copies: `ipc.REQUEST`)."""

    front: Front
    blocks: np.ndarray  # int32
    records: np.ndarray  # REQUEST
    enqueued: float

    @property
    def n(self) -> np.ndarray:
        return self.records["n"]

    def part(self, keep) -> Chunk:
        return Chunk(self.front, self.blocks[keep], self.records[keep], self.enqueued)


class Lane(FollowsPolicy):
    """One model version's queue and its runner threads (`instances` of them): the engine
    process's dynamic batcher for that version. Its face to `LocalModel` is the asyncio
    `Batcher`'s (start, drain, close, admit, longest_running_s and the policy's attributes)."""

    def __init__(
        self,
        core: EngineCore,
        key: int,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        model: str,
        backend: str,
        stats: Statistics,
        **policy,
    ):
        self.policy = BatchPolicy(**policy)
        self.core = core
        self.key = key
        self._infer = infer
        self.model = model
        self.stats = stats
        self.accepting = False
        self.queue: deque[Chunk] = deque()
        self.queued_images = 0
        self.parked = 0  # runners waiting on the doorbells
        self.running: dict[int, float] = {}  # runner -> when its batch's engine call began
        self._stopping = False  # closing: runners leave, nothing more is queued
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._threads: list[threading.Thread] = []
        self._mean_batch_s = 0.05  # running estimate for Retry-After
        self._m = metrics.BatcherSeries(model, backend)
        self._m_images = [metrics.IMAGES.labels(model, p) for p in PROTOCOLS]
        self._m_core_cpu = metrics.ENGINE_CORE_CPU.labels(model)

    # --- lifecycle (the event loop's side) ---------------------------------------------------

    def start(self) -> None:
        self.accepting = True
        for i in range(self.instances):
            thread = threading.Thread(target=self._run, name=f"engine-{self.model}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop_accepting(self) -> None:
        self.accepting = False

    def admit(self) -> None:  # the fronts check their own rings; nothing waits in this process
        return None

    def longest_running_s(self) -> float:
        running = list(self.running.values())
        return time.monotonic() - min(running) if running else 0.0

    def show_depth(self, images: int) -> None:
        """`quicknet_queue_images` for this version (sampled by `EngineCore.report_depth`)."""
        self._m.depth.set(images)

    def busy(self) -> bool:
        return bool(self.queue or self.running)

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, finish what is queued and running; True if it all finished in time."""
        self.accepting = False
        self.wake()
        deadline = time.monotonic() + timeout_s
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.busy()

    async def close(self) -> None:
        if self._stopping:
            return
        with self.core.lock:
            self._stopping = True
            self.accepting = False
            refused, self.queue = self.queue, deque()
            self.queued_images = 0
            for chunk in refused:
                self._refuse(chunk, NOT_ACCEPTING)
        self.wake()
        await asyncio.to_thread(self._join)
        self.core.remove_lane(self)
        wake, self._wake = self._wake, -1  # never written again: the number may be another file's soon
        os.close(wake)

    def _join(self) -> None:
        for thread in self._threads:
            thread.join()

    def wake(self) -> None:
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

    # --- the queue (callers hold the core's lock) ---------------------------------------------

    def _refuse(self, chunk: Chunk, status: int, retry_after: float = 0.0) -> None:
        """Answer these records with a refusal; Triton's `fail` statistics count them."""
        chunk.front.answer_all(chunk.blocks, status, retry_after)
        requests = int((chunk.records["part"] == 0).sum())  # a split request counts once
        self.stats.record_failures(max(0.0, time.monotonic() - chunk.enqueued) * requests, requests)

    def put(self, chunk: Chunk) -> None:
        if not self.accepting:
            self._refuse(chunk, NOT_ACCEPTING)
            return
        room = self.max_queue_images - self.queued_images
        total = int(chunk.n.sum())
        if total > room:  # the records past the room are refused, in order
            fits = np.cumsum(chunk.n) <= room
            self._refuse(chunk.part(~fits), QUEUE_FULL, self._retry_after())
            chunk = chunk.part(fits)
            total = int(chunk.n.sum())
            if not total:
                return
        self.queue.append(chunk)
        self.queued_images += total

    def _retry_after(self) -> float:
        return self.policy.retry_after(self.queued_images, self._mean_batch_s)

    def _take(self, now: float) -> tuple[list[Chunk], float | None]:
        """The next batch's records, or ([], seconds to wait for a fuller one / None)."""
        if not self.queue:
            return [], None
        if self.max_queue_delay_s > 0 and self.queued_images < self.max_batch_size:
            wait = self.queue[0].enqueued + self.max_queue_delay_s - now
            if wait > 0 and self.accepting:  # draining: no reason to wait
                return [], wait
        batch, room = [], self.max_batch_size
        while self.queue and room > 0:
            chunk = self.queue[0]
            if chunk.front.gone:
                cancelled = np.ones(len(chunk.blocks), bool)
            else:
                cancelled = chunk.front.ring.requests["cancel"][chunk.blocks] != 0
            expired = chunk.records["deadline"] <= now
            dead = cancelled | expired
            if dead.any():  # never computed: each is answered now, once
                if not chunk.front.gone:
                    if cancelled.any():
                        chunk.front.answer_all(chunk.blocks[cancelled], CANCELLED)
                    if (expired & ~cancelled).any():
                        self._refuse(chunk.part(expired & ~cancelled), DEADLINE)
                self.queued_images -= int(chunk.n[dead].sum())
                chunk = chunk.part(~dead)
                if not len(chunk.blocks):
                    self.queue.popleft()
                    continue
                self.queue[0] = chunk
            fits = int(np.searchsorted(np.cumsum(chunk.n), room, side="right"))
            if fits == 0:
                break
            taken = chunk if fits == len(chunk.blocks) else chunk.part(slice(0, fits))
            if fits == len(chunk.blocks):
                self.queue.popleft()
            else:
                self.queue[0] = chunk.part(slice(fits, None))
            size = int(taken.n.sum())
            room -= size
            self.queued_images -= size
            batch.append(taken)
        size = self.max_batch_size - room
        target = self.policy.trim_to(size, sum(len(c.blocks) for c in batch))
        if target is not None:
            while size > target and sum(len(c.blocks) for c in batch) > 1:
                last = batch.pop()  # its last record goes back to the head of the queue
                back = last.part(slice(len(last.blocks) - 1, None))
                self.queue.appendleft(back)
                self.queued_images += int(back.n.sum())
                size -= int(back.n.sum())
                if len(last.blocks) > 1:
                    batch.append(last.part(slice(0, len(last.blocks) - 1)))
        return batch, None

    # --- a runner ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._serve()
            except Exception:  # a bug: logged; the runner goes on (a dead runner would strand its version)
                log.exception("an engine core runner of %s failed; it goes on", self.model)
                time.sleep(0.01)

    def _serve(self) -> None:
        core, me = self.core, threading.get_ident()
        poller, polled = select.poll(), -1
        cpu = time.thread_time()  # this runner's CPU outside the engine call, counted once a batch
        while True:
            with core.lock:
                if self._stopping:
                    return
                core.collect(self)
                batch, wait = self._take(time.monotonic())
                if not batch:  # park: the fronts ring from now on; look once more after saying so
                    self.parked += 1
                    core.parked_changed(+1)
                    try:
                        fence()
                        core.collect(self, parking=True)
                        batch, wait = self._take(time.monotonic())
                    finally:
                        if batch or sys.exc_info()[0] is not None:
                            self.parked -= 1
                            core.parked_changed(-1)
                if batch:
                    self.running[me] = time.monotonic()
                    self._m.in_flight.set(len(self.running))
                if polled != core.generation:  # fronts came or went
                    poller, polled = core.poller(self._wake), core.generation
            if batch:
                try:
                    in_engine = self._execute(batch)
                finally:
                    with core.lock:
                        del self.running[me]
                        self._m.in_flight.set(len(self.running))
                now = time.thread_time()
                self._m_core_cpu.inc(max(0.0, now - cpu - in_engine))
                cpu = now
                continue
            timeout = PARKED_WAIT_S if wait is None else min(wait, PARKED_WAIT_S)
            try:
                for fd, _ in poller.poll(timeout * 1000):
                    with contextlib.suppress(BlockingIOError, OSError):
                        if fd == self._wake or TAIL_IN_MEMORY:  # elsewhere the doorbell's count is the tail
                            os.eventfd_read(fd)
            finally:
                with core.lock:
                    self.parked -= 1
                    core.parked_changed(-1)

    def _execute(self, batch: list[Chunk]) -> float:
        """Run one batch and answer it; returns this thread's CPU seconds inside the engine call.
        Whatever fails (the engine, or the batch's assembly) answers every request of the batch
        with the reason, once; the runner goes on to the next batch."""
        started = time.monotonic()
        cpu_called = None  # read just before the engine call: a failed assembly spent nothing inside it
        try:
            parts = [_Gather(chunk) for chunk in batch]
            for chunk in batch:
                chunk.front.ring.answers["status"][chunk.blocks] = RUNNING  # past its deadline's reach
            images = parts[0].pixels() if len(parts) == 1 else np.concatenate([p.pixels() for p in parts])
            called, cpu_called = time.monotonic(), time.thread_time()
            logits = self._infer(images)
            returned, in_engine = time.monotonic(), time.thread_time() - cpu_called
            if getattr(logits, "shape", None) != (len(images), 10):
                raise ValueError(f"the engine answered {len(images)} images with logits of shape {np.shape(logits)}")
        except Exception as e:  # the engine failed: every request of the batch hears why, one line
            log.error("engine failed on a batch of %s: %r", self.model, e)
            self._fail(batch, EngineFailure(f"{type(e).__name__}: {e}"))
            return 0.0 if cpu_called is None else time.thread_time() - cpu_called
        input_s, infer_s = called - started, returned - called
        self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * infer_s
        # metrics and statistics first (a client that reads them after its answer finds itself),
        # once a batch; a request split into parts counts once (its first part)
        records = batch[0].records if len(batch) == 1 else np.concatenate([c.records for c in batch])
        waits = np.concatenate([np.full(len(c.blocks), started - c.enqueued) for c in batch])
        metrics.observe_many(self._m.queued, waits)
        self._m.infer.observe(infer_s)
        self._m.batch.observe(len(images))
        per_protocol = np.bincount(records["protocol"], weights=records["n"], minlength=len(PROTOCOLS))
        for index in np.flatnonzero(per_protocol).tolist():
            self._m_images[index].inc(int(per_protocol[index]))
        first = records["part"] == 0
        output_s = time.monotonic() - returned  # the answers' own time is not in it: they are the answer
        self.stats.record_batch(len(images), input_s, infer_s, output_s)
        self.stats.record_requests(waits[first].tolist(), len(images), input_s, infer_s, output_s)
        # one answer a front: its logits, answers and completion entries under its lock, one signal
        by_front: dict[Front, list[tuple[Chunk, _Gather, int]]] = {}
        offset = 0
        for chunk, part in zip(batch, parts, strict=True):
            by_front.setdefault(chunk.front, []).append((chunk, part, offset))
            offset += part.count
        for front, pieces in by_front.items():
            blocks = pieces[0][0].blocks if len(pieces) == 1 else np.concatenate([c.blocks for c, _, _ in pieces])
            answers = np.zeros(len(blocks), ANSWER)
            answers["status"] = OK
            if len(by_front) == 1:  # its blocks are the batch's, in `waits`' order
                answers["queue_s"] = waits
            else:
                waited = [np.full(len(c.blocks), started - c.enqueued) for c, _, _ in pieces]
                answers["queue_s"] = np.concatenate(waited)
            answers["infer_s"], answers["input_s"], answers["output_s"] = infer_s, input_s, output_s

            def scatter(pieces=pieces) -> None:
                for _, part, at in pieces:
                    part.scatter(logits, at)

            try:
                front.answer(blocks, answers, scatter)
            except Exception as e:  # a bug: this front's requests hear so; nothing is answered twice
                log.exception("answering a batch of %s failed", self.model)
                front.fail(blocks.tolist(), EngineFailure(f"{type(e).__name__}: {e}"))
        return in_engine

    def _fail(self, batch: list[Chunk], refusal: EngineFailure) -> None:
        for chunk in batch:
            if not chunk.front.gone:
                chunk.front.fail(chunk.blocks.tolist(), refusal)
            requests = int((chunk.records["part"] == 0).sum())
            self.stats.record_failures((time.monotonic() - chunk.enqueued) * requests, requests)


class _Gather:
    """One front's part of a batch: where its images sit in the ring and where their logits go."""

    def __init__(self, chunk: Chunk):
        self.ring = chunk.front.ring
        if (chunk.n == 1).all():  # one image a request, the common case: one index per record
            self.where = (chunk.blocks, 0)
            self.count = len(chunk.blocks)
        else:
            starts = np.cumsum(chunk.n) - chunk.n
            self.count = int(chunk.n.sum())
            self.where = (np.repeat(chunk.blocks, chunk.n), np.arange(self.count) - np.repeat(starts, chunk.n))

    def pixels(self) -> np.ndarray:
        return self.ring.pixels[self.where]

    def scatter(self, logits: np.ndarray, offset: int) -> None:
        self.ring.logits[self.where] = logits[offset : offset + self.count]


class EngineCore:
    """Every connected front and every served version's lane; one lock over the queues."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fronts: list[Front] = []
        self.lanes: dict[int, Lane] = {}
        self.generation = 0  # bumped when the fronts change: runners rebuild their poll sets
        self.parked = 0
        self._keys = itertools.count(1)

    def lane(self, infer, **policy) -> Lane:
        lane = Lane(self, next(self._keys), infer, **policy)
        with self.lock:
            self.lanes[lane.key] = lane
        return lane

    def remove_lane(self, lane: Lane) -> None:
        with self.lock:
            self.lanes.pop(lane.key, None)

    def add_front(self, front: Front) -> None:
        with self.lock:
            front.ring.engine_idle = self.parked > 0
            self.fronts.append(front)
            self.generation += 1
        self._wake_lanes()

    def remove_front(self, front: Front) -> None:
        """The front is gone: its queued records are dropped unanswered (nobody reads them)."""
        with self.lock:
            front.gone = True
            if front in self.fronts:
                self.fronts.remove(front)
            self.generation += 1
            for lane in self.lanes.values():
                kept = deque(c for c in lane.queue if c.front is not front)
                lane.queued_images = sum(int(c.n.sum()) for c in kept)
                lane.queue = kept
        self._wake_lanes()

    def waiting_images(self) -> dict[int, int]:
        """Images waiting, by lane key: queued, and published but not yet collected (a runner
        collects only between batches). Read without the lock: a snapshot, off by a record at most."""
        waiting = {key: lane.queued_images for key, lane in self.lanes.items()}
        if TAIL_IN_MEMORY:  # elsewhere the tail is in the doorbell's count, read only by collecting
            for front in list(self.fronts):
                head, tail = front.head, front.ring.sub_tail
                if tail > head:
                    records = front.ring.requests[front.ring.sub[front.ring.positions(head, tail - head)]]
                    for key, n in zip(records["model"].tolist(), records["n"].tolist(), strict=True):
                        if key in waiting:
                            waiting[key] += n
        return waiting

    async def report_depth(self, period_s: float = 0.1) -> None:
        """`quicknet_queue_images`, sampled: runners do not stop mid-batch to count."""
        while True:
            for key, images in self.waiting_images().items():
                lane = self.lanes.get(key)
                if lane is not None:
                    lane.show_depth(images)
            await asyncio.sleep(period_s)

    def poller(self, wake: int) -> select.poll:
        poller = select.poll()
        poller.register(wake, select.POLLIN)
        for front in self.fronts:
            poller.register(front.doorbell, select.POLLIN)
        return poller

    def parked_changed(self, delta: int) -> None:
        """Fronts ring while any runner is parked (the caller holds the lock)."""
        before = self.parked > 0
        self.parked += delta
        if (self.parked > 0) != before:
            for front in self.fronts:
                front.ring.engine_idle = self.parked > 0

    def collect(self, caller: Lane | None = None, parking: bool = False) -> None:
        """Every front's new records into their versions' queues (the caller holds the lock). A lane
        given work while its runners are parked is woken, but not for the runner collecting (it
        takes its batch itself), which is counted parked while `parking`."""
        now = time.monotonic()
        for front in self.fronts:
            blocks = front.new_blocks()
            if blocks is None:
                continue
            records = front.ring.requests[blocks]
            keys = records["model"]
            first = keys[0]
            groups = [(first, slice(None))] if (keys == first).all() else [(k, keys == k) for k in np.unique(keys)]
            for key, which in groups:
                lane = self.lanes.get(int(key))
                chunk = Chunk(front, blocks[which], records[which], now)
                if lane is None:
                    front.answer_all(chunk.blocks, NOT_FOUND)
                    continue
                lane.put(chunk)
                if lane.parked > (1 if lane is caller and parking else 0):
                    lane.wake()

    def stop_accepting(self) -> None:
        for lane in list(self.lanes.values()):
            lane.stop_accepting()
        self._wake_lanes()

    def _wake_lanes(self) -> None:
        """Every runner looks again now (fronts came or went, or work is refused from now on)."""
        for lane in list(self.lanes.values()):
            lane.wake()
