"""The seam between front processes and the engine process (`--workers` > 1): the shared-memory
ring, the socket's framing, and the engine's side (`EngineServer`, one `FrontLink` per front).
The front's side is `sources/remote.py`.

Pixels cross through shared memory, never through pickling: each front owns a ring of blocks
(`BLOCK_IMAGES` images in, their logits out) in a memfd that it hands to the engine once, over
the Unix socket, as a file descriptor. Everything else crosses that socket as the typed messages
of `messages.py`, length-prefixed and pickled.

The engine works per batch, not per request (as vLLM's engine core and Triton's batcher do): a
front sends every request it accepted in one loop iteration for one model as one `Submits` record
array; the engine queues each record as a batcher item with this front as its sink (no task,
future or timer per request: deadlines are swept per batcher, cancellations looked up by id);
when a batch returns, its logits go straight into the fronts' rings and each front hears one
`Dones` for all of its requests in that batch. A request larger than the engine's batch takes
the general path (`LocalModel.submit`, split across batches); it is rare and its images pay for it.

The engine answers every submit exactly once (a cancelled one too), and a front reuses a
request's blocks only after that answer, so the engine never reads or writes a block that
was handed to another request (one exception: a batch still running when the engine closes, past
its drain, is answered at once and its result dropped, while the engine thread may still read).
Deadlines are `time.monotonic()`, one clock for every process.
If the engine goes away, every waiting request is answered 503 / UNAVAILABLE at once and the
front turns unready until a new engine is up and warm.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import pickle
import socket
import struct
import time
from collections import deque

import numpy as np

from quicknet.serve import messages as m
from quicknet.serve.batcher import Item, Timing
from quicknet.serve.errors import (
    EngineFailure,
    ModelNotFound,
    NotAccepting,
    Refusal,
    RepositoryError,
    to_wire,
)

log = logging.getLogger("quicknet.ipc")

BLOCK_IMAGES = 16
IMAGE_BYTES = 32 * 32 * 3
LOGIT_BYTES = 10 * 4
_LENGTH = struct.Struct("<I")


class Ring:
    """A front's shared memory: `blocks` blocks of BLOCK_IMAGES images, then their logits."""

    def __init__(self, fd: int, blocks: int):
        self.fd = fd
        self.blocks = blocks
        size = blocks * BLOCK_IMAGES * (IMAGE_BYTES + LOGIT_BYTES)
        self.memory = mmap.mmap(fd, size)
        self.pixels = np.ndarray((blocks, BLOCK_IMAGES, 32, 32, 3), np.uint8, self.memory)
        self.logits = np.ndarray(
            (blocks, BLOCK_IMAGES, 10), np.float32, self.memory, offset=blocks * BLOCK_IMAGES * IMAGE_BYTES
        )
        self.free: deque[int] = deque(range(blocks))

    @classmethod
    def create(cls, images: int) -> Ring:
        blocks = max(1, -(-images // BLOCK_IMAGES))
        fd = os.memfd_create("quicknet-ring", os.MFD_CLOEXEC)
        os.ftruncate(fd, blocks * BLOCK_IMAGES * (IMAGE_BYTES + LOGIT_BYTES))
        return cls(fd, blocks)

    # --- front side --------------------------------------------------------------------------

    def alloc(self, n: int) -> tuple[int, ...] | None:
        need = -(-n // BLOCK_IMAGES)
        if need > len(self.free):
            return None
        return tuple(self.free.popleft() for _ in range(need))

    def release(self, blocks: tuple[int, ...]) -> None:
        self.free.extend(blocks)

    def write(self, blocks: tuple[int, ...], images: np.ndarray) -> None:
        for i, b in enumerate(blocks):
            part = images[i * BLOCK_IMAGES : (i + 1) * BLOCK_IMAGES]
            self.pixels[b, : len(part)] = part

    def read_logits(self, blocks: tuple[int, ...], n: int) -> np.ndarray:
        if len(blocks) == 1:
            return self.logits[blocks[0], :n].copy()
        return np.array(self.logits[list(blocks)].reshape(-1, 10)[:n])

    # --- engine side -------------------------------------------------------------------------

    def images(self, blocks: tuple[int, ...], n: int) -> np.ndarray:
        """A view when the request fits one block (no copy); else one gather copy."""
        if len(blocks) == 1:
            return self.pixels[blocks[0], :n]
        return self.pixels[list(blocks)].reshape(-1, 32, 32, 3)[:n]

    def write_logits(self, blocks: tuple[int, ...], logits: np.ndarray) -> None:
        if len(blocks) == 1:
            self.logits[blocks[0], : len(logits)] = logits
            return
        for i, b in enumerate(blocks):
            part = logits[i * BLOCK_IMAGES : (i + 1) * BLOCK_IMAGES]
            self.logits[b, : len(part)] = part


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> object:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


class Outbox:
    """Messages written in one loop iteration leave in one write (one syscall under load)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.frames: list[bytes] = []

    def send(self, message: object) -> None:
        if not self.frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self.frames.append(frame(message))

    def _flush(self) -> None:
        data, self.frames = b"".join(self.frames), []
        if not self.writer.is_closing():
            self.writer.write(data)


# --- engine side -----------------------------------------------------------------------------


class FrontLink:
    """One connected front, on the engine's side: its ring, its requests in the engine, and the
    batcher's sink for them. Whatever a batch finished for this front leaves as one `Dones`."""

    def __init__(self, outbox: Outbox, ring: Ring, pid: int):
        self.outbox = outbox
        self.ring = ring
        self.pid = pid
        self.items: dict[int, Item] = {}  # queued or running, by the front's request id
        self.tasks: dict[int, asyncio.Task] = {}  # the general path's requests and repository calls
        self.cancelled: set[int] = set()  # running when their clients left: answered when their batch returns
        self._done: list[tuple] = []
        self._flush_scheduled = False

    # the batcher's sink ---------------------------------------------------------------------------

    def done(self, item: Item, logits: np.ndarray, timing: Timing) -> None:
        request_id, blocks, _ = item.ticket
        if self.items.pop(request_id, None) is None:  # the front is gone
            return
        if request_id in self.cancelled:  # its client left while it ran: the blocks are free now
            self.cancelled.discard(request_id)
            self.error(request_id, EngineFailure("cancelled"))
            return
        item.answered = True  # its model counts it a success (`LocalModel._record_sink_batch`)
        self.deliver(request_id, blocks, logits, timing)

    def fail(self, item: Item, error: BaseException) -> None:
        request_id, _, stats = item.ticket
        if self.items.pop(request_id, None) is None:
            return
        self.cancelled.discard(request_id)
        stats.fail.add(time.monotonic() - item.enqueued)  # refused or failed: Triton's `fail` counts it
        refusal = error if isinstance(error, Refusal) else EngineFailure(f"{type(error).__name__}: {error}")
        self.error(request_id, refusal)

    # -----------------------------------------------------------------------------------------------

    def deliver(self, request_id: int, blocks: tuple[int, ...], logits: np.ndarray, timing: Timing) -> None:
        """Logits into the request's blocks; its answer joins this front's `Dones` for this loop pass."""
        self.ring.write_logits(blocks, logits)
        self._done.append((request_id, timing.queue_s, timing.infer_s, timing.input_s, timing.output_s))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def error(self, request_id: int, refusal: Refusal) -> None:
        self.outbox.send(m.Error(request_id, *to_wire(refusal)))

    def _flush(self) -> None:
        self._flush_scheduled = False
        done, self._done = self._done, []
        if done:
            self.outbox.send(m.Dones(np.array(done, m.DONE)))

    def cancel(self, request_id: int) -> None:
        """The front's client went away. Still queued: dropped and answered now. In a batch: answered
        when the batch returns (the engine may still be reading its blocks until then)."""
        item = self.items.get(request_id)
        if item is None:
            if request_id in self.tasks:
                self.tasks[request_id].cancel()
        elif item.taken:
            self.cancelled.add(request_id)
        else:
            del self.items[request_id]
            item.cancel()
            self.error(request_id, EngineFailure("cancelled"))

    def drop_all(self) -> None:
        """The front is gone: nothing of its is computed if it can be helped, nothing answered."""
        for item in self.items.values():
            item.cancel()
        self.items.clear()
        for task in list(self.tasks.values()):
            task.cancel()


class EngineServer:
    """The engine process's side: accepts fronts, runs their requests on the engine's batchers."""

    def __init__(self, path: str, engine):
        self.path = path
        self.engine = engine  # quicknet.serve.engine.Engine: the served versions and their lifecycle
        self.ready = False
        self.accepting = True
        self.stalled: str | None = None
        self.outboxes: set[Outbox] = set()
        self.sock: socket.socket | None = None
        self._accepting_task: asyncio.Task | None = None
        self._front_tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        sock.listen(64)
        sock.setblocking(False)
        self.sock = sock
        self._accepting_task = asyncio.create_task(self._accept_forever())

    def publish(self) -> None:
        """The engine's served versions changed (or it became ready): every front hears it."""
        self.ready = True
        self._broadcast()

    def stop_accepting(self) -> None:
        self.accepting = False
        self.ready = False
        self._broadcast()

    def set_stalled(self, reason: str | None) -> None:
        """The watchdog's verdict, for every front's liveness."""
        self.stalled = reason
        for outbox in self.outboxes:
            outbox.send(m.Stalled(reason))

    def _state(self) -> m.State:
        return m.State(self.ready, [model.info for model in self.engine.models], self.engine.default_name)

    def _broadcast(self) -> None:
        for outbox in self.outboxes:
            outbox.send(self._state())

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._serve_front(conn))
            self._front_tasks.add(task)
            task.add_done_callback(self._front_tasks.discard)

    async def _serve_front(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            raw, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 1 << 16, 1)
            conn.setblocking(False)
            (length,) = _LENGTH.unpack_from(raw)
            hello = pickle.loads(raw[_LENGTH.size : _LENGTH.size + length])
            if not isinstance(hello, m.Hello):
                raise ValueError(f"expected Hello, got {type(hello).__name__}")
            ring = Ring(fds[0], hello.blocks)
            os.close(fds[0])  # the mapping keeps the memory; the descriptor is no longer needed
        except (OSError, ValueError, IndexError, pickle.UnpicklingError) as e:
            log.warning("a front failed its handshake: %s", e)
            conn.close()
            return
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        outbox = Outbox(writer)
        link = FrontLink(outbox, ring, hello.pid)
        self.outboxes.add(outbox)
        outbox.send(self._state())
        if self.stalled:
            outbox.send(m.Stalled(self.stalled))
        log.info("front process %d connected", hello.pid)
        try:
            while True:
                message = await read_message(reader)
                if isinstance(message, m.Submits):
                    self._submits(link, message)
                elif isinstance(message, m.Cancels):
                    for request_id in message.ids:
                        link.cancel(request_id)
                elif isinstance(message, m.Stats):
                    await self._stats(outbox, message)
                elif isinstance(message, m.Call):
                    self._spawn(link, message.id, self._repository_call(outbox, message))
                else:
                    log.warning("front process %d sent an unknown message %s", hello.pid, type(message).__name__)
        except (OSError, asyncio.IncompleteReadError, EOFError):
            log.info("front process %d disconnected", hello.pid)
        finally:
            self.outboxes.discard(outbox)
            link.drop_all()
            writer.close()

    @staticmethod
    def _spawn(link: FrontLink, request_id: int, job) -> None:
        task = asyncio.create_task(job)
        link.tasks[request_id] = task
        task.add_done_callback(lambda _t: link.tasks.pop(request_id, None))

    def _submits(self, link: FrontLink, submits: m.Submits) -> None:
        """One front's requests for one model version, queued as batcher items in one pass."""
        model = self.engine.lookup(submits.model, submits.version)  # a retiring version still serves its own
        records = submits.records.tolist()
        refusal: Refusal | None = None
        if model is None:
            refusal = ModelNotFound(f"model {submits.model!r} v{submits.version} is not served")
        elif not self.accepting:
            refusal = NotAccepting("engine is shutting down; retry shortly", "draining")
        if refusal is not None:
            for request_id, *_ in records:
                link.error(request_id, refusal)
            return
        flat = submits.blocks.tolist()
        ring, largest, protocol, stats = link.ring, model.batcher.max_batch_size, submits.protocol, model.stats
        items = []
        for request_id, first, count, n, deadline in records:
            blocks = tuple(flat[first : first + count])
            if n > largest:  # split across batches: the general path, a task of its own
                self._spawn(link, request_id, self._run(link, model, request_id, blocks, n, deadline, protocol))
                continue
            item = Item(ring.images(blocks, n), deadline, None, protocol, sink=link, ticket=(request_id, blocks, stats))
            link.items[request_id] = item
            items.append(item)
        if items:
            model.enqueue(items)

    async def _run(self, link: FrontLink, model, request_id: int, blocks, n: int, deadline: float, protocol: str):
        try:
            logits, timing = await model.submit(link.ring.images(blocks, n), deadline, protocol)
        except asyncio.CancelledError:  # the front cancelled it, or the engine is stopping: its future ends
            link.error(request_id, EngineFailure("cancelled"))
            return
        except Refusal as e:
            link.error(request_id, e)
            return
        except Exception as e:  # the engine failed on this request's batch: the reason travels
            link.error(request_id, EngineFailure(str(e)))
            return
        link.deliver(request_id, blocks, logits, timing)

    async def _repository_call(self, outbox: Outbox, call: m.Call) -> None:
        """index / load / unload on the engine, for a front's repository API."""
        try:
            if call.method == "index":
                result = self.engine.index(*call.args)
            elif call.method == "load":
                result = await self.engine.load_model(*call.args)
            else:
                result = await self.engine.unload_model(*call.args)
        except Refusal as e:
            outbox.send(m.Error(call.id, *to_wire(e)))
        except Exception:  # a bug: the front still gets its answer (one line), never a request left waiting
            log.exception("repository %s failed in the engine process", call.method)
            failed = RepositoryError(f"repository {call.method} failed; see the server log")
            outbox.send(m.Error(call.id, *to_wire(failed)))
        else:
            outbox.send(m.Result(call.id, result))

    async def _stats(self, outbox: Outbox, stats: m.Stats) -> None:
        model = self.engine.lookup(stats.model, stats.version)
        if model is None:
            refusal = ModelNotFound(f"model {stats.model!r} v{stats.version} is not served")
            outbox.send(m.Error(stats.id, *to_wire(refusal)))
        else:
            outbox.send(m.Result(stats.id, await model.statistics()))

    async def close(self) -> None:
        if self._accepting_task is not None:
            self._accepting_task.cancel()
        if self.sock is not None:
            self.sock.close()
        for outbox in list(self.outboxes):
            outbox.writer.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
