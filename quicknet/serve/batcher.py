"""The dynamic batcher: one bounded queue in front of the engine, shared by every front.

Vocabulary from Triton's dynamic batcher. A batch forms as soon as an engine slot (`instances`)
is free, from everything queued up to `max_batch_size` (whole requests; a request larger than
the maximum is split). `max_queue_delay` optionally waits for a fuller batch; `preferred_batch_sizes`
trims a batch to the largest preferred size that fits (for engines with fixed shapes).

Every item carries a deadline. Expired items are dropped before compute (DeadlineExceeded);
cancelled items (client gone) are skipped. A full queue refuses at once (QueueFull), so overload
turns into fast 429s instead of growing latency. The engine runs in a thread pool, off the loop.
This module knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from quicknet.serve import metrics
from quicknet.serve.errors import DeadlineExceeded, NotAccepting, QueueFull


@dataclass(eq=False)
class Item:
    """One request, or one part of a request larger than a batch, answered through its future."""

    images: np.ndarray
    deadline: float  # time.monotonic()
    future: asyncio.Future
    protocol: str  # an opaque tag for metrics
    enqueued: float = field(default_factory=time.monotonic)
    taken: bool = False  # in a batch: past the point where a deadline can spare the engine

    @property
    def n(self) -> int:
        return len(self.images)

    @property
    def closed(self) -> bool:
        return self.future.done()

    def resolve(self, logits: np.ndarray, timing: Timing) -> None:
        if not self.future.done():
            self.future.set_result((logits, timing))

    def reject(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(frozen=True)
class Timing:
    """One request's time in the batcher: queued, then its batch's assembly (input), engine call
    (infer) and result scatter (output). A request split over several batches sums the phases."""

    queue_s: float
    infer_s: float
    input_s: float = 0.0
    output_s: float = 0.0


@dataclass(frozen=True)
class BatchPolicy:
    """When a batch forms, in Triton's words; one policy for both batchers that follow it: this
    module's (one process) and the engine core's lane (`engine_core.Lane`, front processes)."""

    max_batch_size: int
    max_queue_images: int
    max_queue_delay_s: float = 0.0
    preferred_batch_sizes: tuple[int, ...] = ()  # kept: those up to max_batch_size, ascending
    instances: int = 1

    def __post_init__(self) -> None:
        kept = tuple(sorted(s for s in self.preferred_batch_sizes if s <= self.max_batch_size))
        object.__setattr__(self, "preferred_batch_sizes", kept)

    def trim_to(self, size: int, requests: int) -> int | None:
        """The size a batch of `size` images from `requests` requests is cut back to (whole
        requests, the last ones back to the queue's head): the largest preferred size that fits,
        when `size` is not one. None: the batch stays as it is."""
        preferred = self.preferred_batch_sizes
        if not preferred or size in preferred or requests < 2:
            return None
        return max((p for p in preferred if p <= size), default=None)

    def retry_after(self, queued_images: int, mean_batch_s: float) -> float:
        """Seconds a refused client should wait: the batches ahead of it, at the recent batch time."""
        batches_ahead = queued_images / max(self.max_batch_size * self.instances, 1)
        return max(1.0, round(batches_ahead * mean_batch_s, 1))


class FollowsPolicy:
    """The policy's values as a batcher's own attributes (what `LocalModel` and tests read)."""

    policy: BatchPolicy

    @property
    def max_batch_size(self) -> int:
        return self.policy.max_batch_size

    @property
    def max_queue_images(self) -> int:
        return self.policy.max_queue_images

    @property
    def max_queue_delay_s(self) -> float:
        return self.policy.max_queue_delay_s

    @property
    def preferred(self) -> tuple[int, ...]:
        return self.policy.preferred_batch_sizes

    @property
    def instances(self) -> int:
        return self.policy.instances


class Batcher(FollowsPolicy):
    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        *,
        model: str,
        backend: str,
        on_batch: Callable[[int, float, float, float], None] | None = None,
        **policy,
    ):
        self.policy = BatchPolicy(**policy)
        self._infer = infer
        self._model = model
        self._backend = backend
        self._on_batch = on_batch
        self._deadlines: list[tuple[float, int, Item]] = []  # queued items by deadline (`_sweep`)
        self._sweep_at: tuple[float, asyncio.TimerHandle] | None = None
        self._seq = itertools.count()
        self._queue: deque[Item] = deque()
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._executor = ThreadPoolExecutor(max_workers=self.instances, thread_name_prefix=f"engine-{model}")
        self._in_flight = 0
        self._running: dict[int, float] = {}  # worker -> when its engine call began (the watchdog reads it)
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self._mean_batch_s = 0.05  # running estimate for Retry-After
        self._m = metrics.BatcherSeries(model, backend)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._workers = [asyncio.create_task(self._worker(), name=f"batcher-{i}") for i in range(self.instances)]

    def stop_accepting(self) -> None:
        self._accepting = False

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work, finish what is queued and in flight; True if it all finished in time."""
        self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._queue or self._in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._idle.clear()
            self._wakeup.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=min(remaining, 0.05))
        return not (self._queue or self._in_flight)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._sweep_at is not None:
            self._sweep_at[1].cancel()
            self._sweep_at = None
        self._deadlines.clear()
        while self._queue:
            self._queue.popleft().reject(NotAccepting("server is shutting down; retry on another replica"))
        self._executor.shutdown(wait=True)

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def admit(self) -> None:
        """Refuse at once (QueueFull) when the queue is already full: under overload a request is
        turned away before its body is read or decoded, the cheapest refusal there is."""
        if self._queued_images >= self.max_queue_images:
            raise QueueFull(self._retry_after())

    def longest_running_s(self) -> float:
        """How long the oldest engine call still running has run (0 when none runs)."""
        return time.monotonic() - min(self._running.values()) if self._running else 0.0

    # --- the seam the fronts use ------------------------------------------------------------

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        """Classify uint8 NHWC `images` before `deadline` (monotonic); returns logits and timing."""
        if not self._accepting:
            raise NotAccepting("server is not accepting work (starting up or shutting down)")
        n = len(images)
        if self._queued_images + n > self.max_queue_images:
            raise QueueFull(self._retry_after())
        loop = asyncio.get_running_loop()
        items = [
            Item(images[i : i + self.max_batch_size], deadline, loop.create_future(), protocol)
            for i in range(0, n, self.max_batch_size)
        ]
        self._put(items)
        try:  # one part (nearly every request) awaits its future alone: gather costs a future more
            results = [await items[0].future] if len(items) == 1 else await asyncio.gather(*(i.future for i in items))
        except BaseException:
            for item in items:  # a cancelled or failed request takes all its parts out of the queue
                item.future.cancel()
            raise
        logits = np.concatenate([r[0] for r in results]) if len(results) > 1 else results[0][0]
        return logits, Timing(
            queue_s=max(r[1].queue_s for r in results),
            infer_s=sum(r[1].infer_s for r in results),
            input_s=sum(r[1].input_s for r in results),
            output_s=sum(r[1].output_s for r in results),
        )

    def _put(self, items: list[Item]) -> None:
        """Queue `items`: per item a queue entry and a deadline-heap entry; per call one depth update,
        one wake-up, one timer check. A deadline is enforced when it passes, not when
        the next batch forms (`_sweep`): the caller hears DeadlineExceeded on time, and queued items
        are skipped (never computed)."""
        for item in items:
            self._queue.append(item)
            self._queued_images += item.n
            heapq.heappush(self._deadlines, (item.deadline, next(self._seq), item))
        if len(self._deadlines) > 2 * len(self._queue) + 64:  # answered items leave the heap lazily: compact
            self._deadlines = [e for e in self._deadlines if not (e[2].taken or e[2].closed)]
            heapq.heapify(self._deadlines)
        self._m.depth.set(self._queued_images)
        self._wakeup.set()
        self._arm_sweep()

    # --- batching ---------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Deadlines, one timer per batcher (not one per request): every queued item whose deadline
        passed hears so now; then the timer is set for the next one."""
        self._sweep_at = None
        now = time.monotonic()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)[2]
            if not item.taken:
                item.reject(DeadlineExceeded("deadline exceeded while queued"))
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        heap = self._deadlines
        while heap and (heap[0][2].taken or heap[0][2].closed):
            heapq.heappop(heap)
        if heap and (self._sweep_at is None or heap[0][0] < self._sweep_at[0]):
            if self._sweep_at is not None:
                self._sweep_at[1].cancel()
            loop = asyncio.get_running_loop()
            self._sweep_at = (
                heap[0][0],
                loop.call_at(loop.time() + max(0.0, heap[0][0] - time.monotonic()), self._sweep),
            )

    def _retry_after(self) -> float:
        return self.policy.retry_after(self._queued_images, self._mean_batch_s)

    def _take_batch(self) -> list[Item]:
        now = time.monotonic()
        batch: list[Item] = []
        size = 0
        while self._queue:
            item = self._queue[0]
            if item.closed:  # cancelled by its client or expired (the front counts the rejection, once)
                self._pop()
                continue
            if item.deadline <= now:
                self._pop()
                item.reject(DeadlineExceeded("deadline exceeded while queued"))
                continue
            if size + item.n > self.max_batch_size:
                break
            batch.append(self._pop())
            item.taken = True
            size += item.n
        target = self.policy.trim_to(size, len(batch))
        if target is not None:
            while size > target and len(batch) > 1:
                item = batch.pop()
                item.taken = False
                size -= item.n
                self._queue.appendleft(item)
                self._queued_images += item.n
        self._m.depth.set(self._queued_images)
        return batch

    def _pop(self) -> Item:
        item = self._queue.popleft()
        self._queued_images -= item.n
        return item

    async def _wait_for_fuller_batch(self) -> None:
        if self.max_queue_delay_s <= 0 or self._queued_images >= self.max_batch_size:
            return
        oldest = self._queue[0].enqueued
        while self._queued_images < self.max_batch_size:
            remaining = oldest + self.max_queue_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if not self._in_flight:
                    self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_fuller_batch()
            batch = self._take_batch()
            if not batch:
                continue
            started = time.monotonic()
            images = batch[0].images if len(batch) == 1 else np.concatenate([b.images for b in batch])
            for item in batch:
                self._m.queued.observe(started - item.enqueued)
            self._in_flight += 1
            self._m.in_flight.set(self._in_flight)
            called = time.monotonic()
            worker = id(asyncio.current_task())
            self._running[worker] = called
            try:
                logits = await loop.run_in_executor(self._executor, self._infer, images)
            except asyncio.CancelledError:  # closing with this batch in the engine: its callers hear why
                for item in batch:
                    item.reject(NotAccepting("server is shutting down; retry on another replica"))
                raise
            except Exception as e:  # the engine failed: every item in the batch learns why
                for item in batch:
                    item.reject(e)
                continue
            finally:
                del self._running[worker]
                self._in_flight -= 1
                self._m.in_flight.set(self._in_flight)
            returned = time.monotonic()
            input_s, infer_s = called - started, returned - called
            self._mean_batch_s = 0.9 * self._mean_batch_s + 0.1 * infer_s
            self._m.infer.observe(infer_s)
            self._m.batch.observe(len(images))
            offset = 0
            parts = []
            for item in batch:
                parts.append((item, logits[offset : offset + item.n]))
                offset += item.n
            output_s = time.monotonic() - returned
            for item, part in parts:
                item.resolve(part, Timing(started - item.enqueued, infer_s, input_s, output_s))
            if self._on_batch is not None:
                self._on_batch(len(images), input_s, infer_s, output_s)
