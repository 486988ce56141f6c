"""The seam between front processes and the engine process (`--workers` > 1).

Pixels cross through shared memory, never through pickling: each front owns a ring of blocks
(`BLOCK_IMAGES` images in, their logits out) in a memfd that it hands to the engine once, over
the Unix socket, as a file descriptor. Requests, results, cancellations, deadlines and the
engine's state cross that socket as small length-prefixed pickled tuples:

    front → engine   ("submit", id, model, version, blocks, n, deadline, protocol)
                     ("cancel", id)          ("stats", id, model, version)
    engine → front   ("state", ready, [ModelInfo], default_model)     ("stalled", reason or None)
                     ("done", id, (queue_s, infer_s, input_s, output_s))   logits are in the blocks
                     ("error", id, kind, message, extra)                    ("stats", id, dict)

The engine answers every submit exactly once (a cancelled one too), and a front reuses a
request's blocks only after that answer, so the engine never reads or writes a block that
was handed to another request. Deadlines are `time.monotonic()`, one clock for every process.
If the engine goes away, every waiting request is answered 503 / UNAVAILABLE at once and the
front turns unready until a new engine is up and warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import pickle
import socket
import struct
from collections import deque

import numpy as np

from quicknet.serve.batcher import Timing
from quicknet.serve.errors import (
    EngineFailure,
    ModelNotFound,
    NotAccepting,
    QueueFull,
    Refusal,
    RepositoryError,
    from_wire,
    to_wire,
)
from quicknet.serve.model import ModelHandle, ModelInfo
from quicknet.serve.runtime import Runtime

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
        out = self.logits[list(blocks)].reshape(-1, 10)[:n]
        return np.array(out)

    # --- engine side -------------------------------------------------------------------------

    def images(self, blocks: tuple[int, ...], n: int) -> np.ndarray:
        """A view when the request fits one block (no copy); else one gather copy."""
        if len(blocks) == 1:
            return self.pixels[blocks[0], :n]
        return self.pixels[list(blocks)].reshape(-1, 32, 32, 3)[:n]

    def write_logits(self, blocks: tuple[int, ...], logits: np.ndarray) -> None:
        for i, b in enumerate(blocks):
            part = logits[i * BLOCK_IMAGES : (i + 1) * BLOCK_IMAGES]
            self.logits[b, : len(part)] = part


def frame(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> tuple:
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    return pickle.loads(await reader.readexactly(length))


class Outbox:
    """Messages written in one loop iteration leave in one write (one syscall under load)."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.frames: list[bytes] = []

    def send(self, message: tuple) -> None:
        if not self.frames:
            asyncio.get_running_loop().call_soon(self._flush)
        self.frames.append(frame(message))

    def _flush(self) -> None:
        data, self.frames = b"".join(self.frames), []
        if not self.writer.is_closing():
            self.writer.write(data)


# --- front side ------------------------------------------------------------------------------


class RemoteModel(ModelHandle):
    def __init__(self, info: ModelInfo, client: EngineClient):
        self.info = info
        self.client = client

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        return await self.client.submit(self.info, images, deadline, protocol)

    async def statistics(self) -> dict:
        return await self.client.statistics(self.info)

    def admit(self) -> None:
        if not self.client.ring.free:  # this front already has as many images in flight as can queue
            raise QueueFull(1.0)


class EngineClient:
    """A front's link to the engine process; it is the front's `ModelSource`."""

    def __init__(self, path: str, runtime: Runtime, ring_images: int):
        self.path = path
        self.runtime = runtime
        runtime.repository = self
        self.ring = Ring.create(ring_images)
        self.ids = itertools.count()
        self.pending: dict[int, tuple[asyncio.Future, tuple[int, ...], int]] = {}
        self.outbox: Outbox | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    async def run(self) -> None:
        """Connect, follow the engine's state, reconnect whenever the engine restarts."""
        while not self.closing:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError, EOFError):
                await self._session()
            self._lost()
            if not self.closing:
                await asyncio.sleep(0.2)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, self.path)
            sock.setblocking(True)
            socket.send_fds(sock, [frame(("hello", os.getpid(), self.ring.blocks))], [self.ring.fd])
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.writer, self.outbox = writer, Outbox(writer)
        try:
            while True:
                self._dispatch(await read_message(reader))
        finally:
            self.outbox = None
            writer.close()

    def _dispatch(self, message: tuple) -> None:
        kind, *rest = message
        if kind == "state":
            ready, infos, default_name = rest
            self.runtime.install([RemoteModel(i, self) for i in infos], default_name, ready=ready and bool(infos))
            return
        if kind == "stalled":
            self.runtime.stalled = rest[0]
            return
        entry = self.pending.pop(rest[0], None)
        if entry is None:
            return
        future, blocks, n = entry
        if kind == "done":
            result = (self.ring.read_logits(blocks, n), Timing(*rest[1]))
            self.ring.release(blocks)
            if not future.done():
                future.set_result(result)
        elif kind == "error":
            self.ring.release(blocks)
            if not future.done():
                future.set_exception(from_wire(*rest[1:]))
        elif kind in ("stats", "result") and not future.done():
            future.set_result(rest[1])
        if not self.pending:
            self._idle.set()

    def _lost(self) -> None:
        """The engine is gone: nothing it held will be answered; every waiting request hears so now."""
        self.runtime.set_ready(False)
        self.runtime.stalled = None  # a new engine starts with a clean watchdog
        pending, self.pending = self.pending, {}
        self.ring.free = deque(range(self.ring.blocks))
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(NotAccepting("engine process is restarting; retry shortly", "engine_unavailable"))
        self._idle.set()

    def _call(self, message_head: tuple, blocks: tuple[int, ...], n: int) -> tuple[int, asyncio.Future]:
        if self.outbox is None:
            raise NotAccepting("engine process is not connected; retry shortly", "engine_unavailable")
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = (future, blocks, n)
        self._idle.clear()
        self.outbox.send((message_head[0], request_id, *message_head[1:]))
        return request_id, future

    async def submit(
        self, info: ModelInfo, images: np.ndarray, deadline: float, protocol: str
    ) -> tuple[np.ndarray, Timing]:
        n = len(images)
        blocks = self.ring.alloc(n)
        if blocks is None:  # this front has as many images in flight as the engine can queue
            raise QueueFull(1.0)
        self.ring.write(blocks, images)
        try:
            request_id, future = self._call(
                ("submit", info.name, info.version, blocks, n, deadline, protocol), blocks, n
            )
        except NotAccepting:
            self.ring.release(blocks)
            raise
        try:
            return await future
        except asyncio.CancelledError:
            if request_id in self.pending and self.outbox is not None:
                self.outbox.send(("cancel", request_id))  # the blocks come back with the engine's answer
            raise

    async def statistics(self, info: ModelInfo) -> dict:
        _, future = self._call(("stats", info.name, info.version), (), 0)
        return await future

    # The repository API, answered by the engine process (runtime.repository is this client).

    async def index(self, ready_only: bool) -> list[dict]:
        _, future = self._call(("call", "index", (ready_only,)), (), 0)
        return await future

    async def load(self, name: str) -> None:
        _, future = self._call(("call", "load", (name,)), (), 0)
        await future

    async def unload(self, name: str) -> None:
        _, future = self._call(("call", "unload", (name,)), (), 0)
        await future

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
        pending, self.pending = self.pending, {}
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(NotAccepting("server is shutting down; retry on another replica", "draining"))
        self._idle.set()
        if self.writer is not None:
            self.writer.close()


# --- engine side -----------------------------------------------------------------------------


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
            outbox.send(("stalled", reason))

    def _state(self) -> tuple:
        return ("state", self.ready, [m.info for m in self.engine.models], self.engine.default_name)

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
            _, pid, blocks = pickle.loads(raw[_LENGTH.size : _LENGTH.size + length])
            ring = Ring(fds[0], blocks)
            os.close(fds[0])  # the mapping keeps the memory; the descriptor is no longer needed
        except (OSError, ValueError, IndexError, pickle.UnpicklingError) as e:
            log.warning("a front failed its handshake: %s", e)
            conn.close()
            return
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        outbox = Outbox(writer)
        self.outboxes.add(outbox)
        outbox.send(self._state())
        if self.stalled:
            outbox.send(("stalled", self.stalled))
        tasks: dict[int, asyncio.Task] = {}
        log.info("front process %d connected", pid)
        try:
            while True:
                message = await read_message(reader)
                kind, request_id = message[0], message[1]
                if kind == "submit":
                    task = asyncio.create_task(self._run(outbox, ring, *message[1:]))
                    tasks[request_id] = task
                    task.add_done_callback(lambda _t, rid=request_id: tasks.pop(rid, None))
                elif kind == "cancel":
                    if request_id in tasks:
                        tasks[request_id].cancel()
                elif kind == "stats":
                    await self._stats(outbox, *message[1:])
                elif kind == "call":
                    task = asyncio.create_task(self._repository_call(outbox, *message[1:]))
                    tasks[request_id] = task
                    task.add_done_callback(lambda _t, rid=request_id: tasks.pop(rid, None))
        except (OSError, asyncio.IncompleteReadError, EOFError):
            log.info("front process %d disconnected", pid)
        finally:
            self.outboxes.discard(outbox)
            for task in list(tasks.values()):
                task.cancel()
            writer.close()

    async def _repository_call(self, outbox: Outbox, request_id: int, method: str, args: tuple) -> None:
        """index / load / unload on the engine, for a front's repository API."""

        try:
            if method == "index":
                result = self.engine.index(*args)
            elif method == "load":
                result = await self.engine.load_model(*args)
            else:
                result = await self.engine.unload_model(*args)
        except Refusal as e:
            outbox.send(("error", request_id, *to_wire(e)))
        except Exception:  # a bug: the front still gets its answer (one line), never a request left waiting
            log.exception("repository %s failed in the engine process", method)
            failed = RepositoryError(f"repository {method} failed; see the server log")
            outbox.send(("error", request_id, *to_wire(failed)))
        else:
            outbox.send(("result", request_id, result))

    async def _stats(self, outbox: Outbox, request_id: int, name: str, version: int) -> None:
        model = self.engine.lookup(name, version)
        if model is None:
            outbox.send(("error", request_id, *to_wire(ModelNotFound(f"model {name!r} v{version} is not served"))))
        else:
            outbox.send(("stats", request_id, await model.statistics()))

    async def _run(
        self,
        outbox: Outbox,
        ring: Ring,
        request_id: int,
        name: str,
        version: int,
        blocks: tuple[int, ...],
        n: int,
        deadline: float,
        protocol: str,
    ) -> None:
        model = self.engine.lookup(name, version)  # a retiring version still serves what was routed to it
        try:
            if model is None:
                raise ModelNotFound(f"model {name!r} v{version} is not served")
            if not self.accepting:
                raise NotAccepting("engine is shutting down; retry shortly", "draining")
            logits, timing = await model.submit(ring.images(blocks, n), deadline, protocol)
        except asyncio.CancelledError:  # the front cancelled it, or the engine is stopping: its future ends
            outbox.send(("error", request_id, *to_wire(EngineFailure("cancelled"))))
            return
        except Refusal as e:
            outbox.send(("error", request_id, *to_wire(e)))
            return
        except Exception as e:  # the engine failed on this request's batch: the reason travels
            outbox.send(("error", request_id, *to_wire(EngineFailure(str(e)))))
            return
        ring.write_logits(blocks, logits)
        outbox.send(("done", request_id, (timing.queue_s, timing.infer_s, timing.input_s, timing.output_s)))

    async def close(self) -> None:
        if self._accepting_task is not None:
            self._accepting_task.cancel()
        if self.sock is not None:
            self.sock.close()
        for outbox in list(self.outboxes):
            outbox.writer.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
