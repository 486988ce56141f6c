"""A front process's model source with `--workers` > 1: the engine process, reached over the
seam in `ipc.py`. A request is a record in the front's shared memory (pixels, model version,
deadline) published on the ring's submission queue; its answer comes back in the same block,
announced by the engine's signal on this front's bell. Its twin for one process is
`sources/local.py`; the runtime cannot tell them apart.

What a request costs this front besides its own HTTP or gRPC work: a few numpy stores into the
ring, one look at the engine's "ring me" flag (a system call only when the engine is parked),
and its share of one bell read a batch. No message, task or timer of its own: deadlines are
watched by one timer for the front (a heap), cancellations are a flag in the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import socket
import time

import numpy as np

from quicknet.serve import messages as m
from quicknet.serve.batcher import Timing
from quicknet.serve.errors import DeadlineExceeded, NotAccepting, QueueFull, from_wire
from quicknet.serve.ipc import (
    BLOCK_IMAGES,
    OK,
    PROTOCOLS,
    QUEUED,
    RUNNING,
    TAIL_IN_MEMORY,
    Outbox,
    Ring,
    fence,
    frame,
    read_message,
    refusal_for,
)
from quicknet.serve.model import ModelHandle, ModelInfo
from quicknet.serve.runtime import Runtime

_PROTOCOL_INDEX = {name: i for i, name in enumerate(PROTOCOLS)}
# A request running in the engine at its deadline is let finish (its answer is moments away); this
# much later it is answered 504 anyway (a hung engine; the watchdog reports that on its own).
RUNNING_GRACE_S = 1.0
log = logging.getLogger("quicknet.remote")


class RemoteModel(ModelHandle):
    def __init__(self, info: ModelInfo, client: EngineClient, key: int, session: int):
        self.info = info
        self.client = client
        self.key = key  # the engine's key for this version, valid in this `session` only
        self.session = session

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        return await self.client.submit(self, images, deadline, protocol)

    async def statistics(self) -> dict:
        return await self.client.statistics(self.info)

    def admit(self) -> None:
        if not self.client.ring.free:  # this front already has as many images in flight as can queue
            raise QueueFull(1.0)


class _Request:
    """One request in the engine: its blocks (one a part), its answer as the parts come back."""

    __slots__ = ("blocks", "deadline", "future", "left", "logits", "model", "n", "overdue", "part", "timing")

    def __init__(self, future, blocks: list[int], n: int, part: int, deadline: float, model: RemoteModel):
        self.future = future
        self.blocks = blocks
        self.n = n
        self.part = part
        self.left = len(blocks)
        self.logits: np.ndarray | None = None
        self.timing = [0.0, 0.0, 0.0, 0.0]  # queue (the longest), infer, input, output (summed)
        self.deadline = deadline
        self.model = model
        self.overdue = False  # running at its deadline: given RUNNING_GRACE_S more, once


class EngineClient:
    """A front's link to the engine process; it is the front's `ModelSource`."""

    def __init__(self, path: str, runtime: Runtime, ring_images: int):
        self.path = path
        self.runtime = runtime
        runtime.repository = self
        self.ring = Ring.create(ring_images)
        self.doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # this front -> the engine
        self.bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the engine -> this front
        self.ids = itertools.count()
        self.owner: dict[int, _Request] = {}  # block -> its request, from publication to the engine's answer
        self.calls: dict[int, asyncio.Future] = {}  # statistics and repository calls
        self.sub_tail = 0  # blocks published since the engine connected
        self.comp_head = 0  # answers read since the engine connected
        self.outbox: Outbox | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.session = 0  # counts connections to an engine: a model's key is good for its own only
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._deadlines: list[tuple[float, int, _Request]] = []  # one timer for the front (`_expire`)
        self._deadline_timer: tuple[float, asyncio.TimerHandle] | None = None
        self._seq = itertools.count()
        self._dispatch = {
            m.State: self._on_state,
            m.Stalled: self._on_stalled,
            m.Failed: self._on_failed,
            m.Error: self._on_error,
            m.Result: self._on_result,
        }

    async def run(self) -> None:
        """Connect, follow the engine's state, reconnect whenever the engine restarts."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.bell, self._on_bell)
        try:
            while not self.closing:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError, EOFError):
                    await self._session()
                self._lost()
                if not self.closing:
                    await asyncio.sleep(0.2)
        finally:
            loop.remove_reader(self.bell)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.path)
            sock.setblocking(True)
            hello = frame(m.Hello(os.getpid(), self.ring.blocks))
            socket.send_fds(sock, [hello], [self.ring.fd, self.doorbell, self.bell])
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.writer, self.outbox = writer, Outbox(writer)
        self.session += 1
        try:
            while True:
                message = await read_message(reader)
                handle = self._dispatch.get(type(message))
                if handle is None:  # a newer engine's message: not ours to act on
                    log.warning("the engine process sent an unknown message %s", type(message).__name__)
                    continue
                handle(message)
        finally:
            self.outbox = None
            writer.close()

    # --- what the engine says ------------------------------------------------------------------

    def _on_state(self, state: m.State) -> None:
        pairs = zip(state.models, state.keys, strict=True)
        models = [RemoteModel(info, self, key, self.session) for info, key in pairs]
        self.runtime.install(models, state.default_model, ready=state.ready and bool(models))
        if self.outbox is not None:
            self.outbox.send(m.Seen(state.generation))

    def _on_stalled(self, stalled: m.Stalled) -> None:
        self.runtime.set_stalled(stalled.reason)

    def _on_bell(self) -> None:
        """The engine answered a batch (or several): every answered block, in one pass."""
        try:
            count = os.eventfd_read(self.bell)
        except BlockingIOError:
            return
        ring = self.ring
        blocks = ring.comp[ring.positions(self.comp_head, count)]
        self.comp_head += count
        answers = ring.answers[blocks]  # a copy: the blocks are free again below
        columns = (answers[f].tolist() for f in ("status", "retry_after", "queue_s", "infer_s", "input_s", "output_s"))
        for block, status, retry_after, *timing in zip(blocks.tolist(), *columns, strict=True):
            self._answered(block, status, retry_after, timing)
        self._check_idle()

    def _release(self, block: int) -> _Request | None:
        """The engine answered `block`: it is free again; its request, if still owned, is returned."""
        request = self.owner.pop(block, None)
        if request is not None:
            self.ring.free.append(block)
            request.left -= 1
        return request

    def _answered(self, block: int, status: int, retry_after: float, timing: list[float]) -> None:
        request = self._release(block)
        if request is None:
            return
        logits = None
        if status == OK and not request.future.done():
            # the block is free again, but only this loop hands it to another request (in `submit`),
            # and nothing between here and the copy awaits: its logits are still this request's
            k = request.blocks.index(block) if len(request.blocks) > 1 else 0
            n = min(request.part, request.n - k * request.part)
            logits = self.ring.logits[block, :n].copy()
        future = request.future
        if future.done():
            return
        if status != OK:
            future.set_exception(refusal_for(status, retry_after, request.model.name, request.model.version))
            return
        t = request.timing
        t[0] = max(t[0], timing[0])
        t[1] += timing[1]
        t[2] += timing[2]
        t[3] += timing[3]
        if len(request.blocks) == 1:
            future.set_result((logits, Timing(t[0], t[1], t[2], t[3])))
            return
        if request.logits is None:
            request.logits = np.empty((request.n, 10), np.float32)
        request.logits[k * request.part : k * request.part + n] = logits
        if request.left == 0:
            future.set_result((request.logits, Timing(t[0], t[1], t[2], t[3])))

    def _on_failed(self, failed: m.Failed) -> None:
        refusal = from_wire(failed.kind, failed.message, failed.extra)
        for block in failed.blocks:
            request = self._release(block)
            if request is not None and not request.future.done():
                request.future.set_exception(refusal)
        self._check_idle()

    def _on_error(self, error: m.Error) -> None:
        future = self.calls.pop(error.id, None)
        if future is not None and not future.done():
            future.set_exception(from_wire(error.kind, error.message, error.extra))
        self._check_idle()

    def _on_result(self, result: m.Result) -> None:
        future = self.calls.pop(result.id, None)
        if future is not None and not future.done():
            future.set_result(result.value)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self.owner and not self.calls:
            self._idle.set()

    def _lost(self) -> None:
        """The engine is gone: nothing it held will be answered; every waiting request hears so now."""
        self.runtime.set_ready(False)
        self.runtime.set_stalled(None)  # a new engine starts with a clean watchdog
        self._fail_waiting(NotAccepting("engine process is restarting; retry shortly", "engine_unavailable"))
        self.ring.reset()
        self.sub_tail = self.comp_head = 0
        for fd in (self.doorbell, self.bell):  # counts the old engine left unread
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)
        self._deadlines.clear()
        if self._deadline_timer is not None:
            self._deadline_timer[1].cancel()
            self._deadline_timer = None

    def _fail_waiting(self, refusal: NotAccepting) -> None:
        """Every request and call still waiting hears `refusal` now; nothing is owned any more."""
        requests = {id(r): r for r in self.owner.values()}.values()
        calls, self.calls, self.owner = self.calls, {}, {}
        for future in [r.future for r in requests] + list(calls.values()):
            if not future.done():
                future.set_exception(refusal)
        self._idle.set()

    # --- what this front asks ------------------------------------------------------------------

    async def submit(
        self, model: RemoteModel, images: np.ndarray, deadline: float, protocol: str
    ) -> tuple[np.ndarray, Timing]:
        if self.outbox is None or model.session != self.session:  # not connected, or an older engine's model
            raise NotAccepting("engine process is not connected; retry shortly", "engine_unavailable")
        n, ring = len(images), self.ring
        part = max(1, min(BLOCK_IMAGES, model.info.max_batch_size))  # a record never exceeds a batch
        count = -(-n // part)
        if count > len(ring.free):  # this front has as many images in flight as the engine can queue
            raise QueueFull(1.0)
        blocks = [ring.free.popleft() for _ in range(count)]
        request = _Request(asyncio.get_running_loop().create_future(), blocks, n, part, deadline, model)
        request_id, proto = next(self.ids), _PROTOCOL_INDEX.get(protocol, len(PROTOCOLS) - 1)
        try:
            for i, block in enumerate(blocks):
                size = min(part, n - i * part)
                ring.pixels[block, :size] = images[i * part : i * part + size]
                ring.requests[block] = (request_id, deadline, model.key, size, i, proto, 0)
                ring.answers["status"][block] = QUEUED
        except Exception:  # not images of 32x32x3 (the fronts check before): the blocks come back
            ring.free.extend(blocks)
            raise
        for block in blocks:
            self.owner[block] = request
        self._publish(blocks)
        self._idle.clear()
        self._watch(request)
        try:
            return await request.future
        except asyncio.CancelledError:  # the client went away: the engine skips it if still queued
            for block in blocks:
                if self.owner.get(block) is request:
                    ring.requests["cancel"][block] = 1
            raise

    def _publish(self, blocks: list[int]) -> None:
        """The blocks onto the submission queue; the doorbell only if the engine is parked."""
        ring, tail, count = self.ring, self.sub_tail, len(blocks)
        if count == 1:
            ring.sub[tail % ring.blocks] = blocks[0]
        else:
            ring.sub[ring.positions(tail, count)] = blocks
        self.sub_tail = tail + count
        if not TAIL_IN_MEMORY:
            os.eventfd_write(self.doorbell, count)
            return
        ring.sub_tail = tail + count
        fence()  # the tail's store before the flag's load (see `ipc.fence`)
        if ring.engine_idle:
            os.eventfd_write(self.doorbell, 1)

    def _watch(self, request: _Request) -> None:
        """Its deadline, on the front's one timer: a request still queued then is answered 504."""
        heap = self._deadlines
        heapq.heappush(heap, (request.deadline, next(self._seq), request))
        if len(heap) > 2 * len(self.owner) + 64:  # answered requests leave the heap lazily: compact
            self._deadlines = heap = [e for e in heap if not e[2].future.done()]
            heapq.heapify(heap)
        if self._deadline_timer is None or request.deadline < self._deadline_timer[0]:
            self._arm(request.deadline)

    def _arm(self, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer[1].cancel()
        loop = asyncio.get_running_loop()
        self._deadline_timer = (when, loop.call_at(loop.time() + max(0.0, when - time.monotonic()), self._expire))

    def _expire(self) -> None:
        self._deadline_timer = None
        heap, now, statuses = self._deadlines, time.monotonic(), self.ring.answers["status"]
        while heap and heap[0][0] <= now:
            request = heapq.heappop(heap)[2]
            if request.future.done():
                continue
            waiting = [b for b in request.blocks if self.owner.get(b) is request]
            running = all(statuses[b] == RUNNING for b in waiting)
            if running and not request.overdue:  # in a batch now: its answer is moments away
                request.overdue = True  # looked at again once RUNNING_GRACE_S more have passed
                heapq.heappush(heap, (now + RUNNING_GRACE_S, next(self._seq), request))
                continue
            for block in waiting:
                self.ring.requests["cancel"][block] = 1  # the engine skips it; the block returns with its answer
            where = "running" if running else "queued"
            request.future.set_exception(DeadlineExceeded(f"deadline exceeded while {where}"))
        while heap and heap[0][2].future.done():
            heapq.heappop(heap)
        if heap:
            self._arm(heap[0][0])

    async def _ask(self, make) -> object:
        if self.outbox is None:
            raise NotAccepting("engine process is not connected; retry shortly", "engine_unavailable")
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.calls[request_id] = future
        self._idle.clear()
        self.outbox.send(make(request_id))
        return await future

    async def statistics(self, info: ModelInfo) -> dict:
        return await self._ask(lambda i: m.Stats(i, info.name, info.version))

    # The repository API, answered by the engine process (runtime.repository is this client).

    async def index(self, ready_only: bool) -> list[dict]:
        return await self._ask(lambda i: m.Index(i, ready_only))

    async def load(self, name: str) -> None:
        await self._ask(lambda i: m.Load(i, name))

    async def unload(self, name: str) -> None:
        await self._ask(lambda i: m.Unload(i, name))

    async def drain(self, timeout_s: float) -> bool:
        """Wait for this front's accepted requests to be answered (the engine keeps running)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop: whatever is still waiting (past the drain period) is answered 503 now."""
        self.closing = True
        self._fail_waiting(NotAccepting("server is shutting down; retry on another replica", "draining"))
        if self.writer is not None:
            self.writer.close()
