"""A front process's model source with `--workers` > 1: the engine process, reached over the
seam in `ipc.py` (pixels in the front's shared-memory ring, typed messages over a Unix socket).
Its twin for one process is `sources/local.py`; the runtime cannot tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections import deque

import numpy as np

from quicknet.serve import messages as m
from quicknet.serve.batcher import Timing
from quicknet.serve.errors import NotAccepting, QueueFull, from_wire
from quicknet.serve.ipc import Outbox, Ring, frame, read_message
from quicknet.serve.model import ModelHandle, ModelInfo
from quicknet.serve.runtime import Runtime


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
        # this loop iteration's submits, by (model, version, protocol), and cancellations: one message each
        self._submits: dict[tuple[str, int, str], list[tuple[int, tuple[int, ...], int, float]]] = {}
        self._cancels: list[int] = []
        self._flush_scheduled = False
        self._dispatch = {
            m.State: self._on_state,
            m.Stalled: self._on_stalled,
            m.Dones: self._on_dones,
            m.Error: self._on_error,
            m.Result: self._on_result,
        }

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
            socket.send_fds(sock, [frame(m.Hello(os.getpid(), self.ring.blocks))], [self.ring.fd])
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        self.writer, self.outbox = writer, Outbox(writer)
        try:
            while True:
                message = await read_message(reader)
                self._dispatch[type(message)](message)
        finally:
            self.outbox = None
            writer.close()

    # --- what the engine says ------------------------------------------------------------------

    def _on_state(self, state: m.State) -> None:
        models = [RemoteModel(i, self) for i in state.models]
        self.runtime.install(models, state.default_model, ready=state.ready and bool(models))

    def _on_stalled(self, stalled: m.Stalled) -> None:
        self.runtime.stalled = stalled.reason

    def _on_dones(self, dones: m.Dones) -> None:
        pending, ring = self.pending, self.ring
        for request_id, queue_s, infer_s, input_s, output_s in dones.records.tolist():
            entry = pending.pop(request_id, None)
            if entry is None:
                continue
            future, blocks, n = entry
            logits = ring.read_logits(blocks, n)
            ring.release(blocks)
            if not future.done():
                future.set_result((logits, Timing(queue_s, infer_s, input_s, output_s)))
        if not pending:
            self._idle.set()

    def _on_error(self, error: m.Error) -> None:
        entry = self.pending.pop(error.id, None)
        if entry is not None:
            future, blocks, _ = entry
            self.ring.release(blocks)
            if not future.done():
                future.set_exception(from_wire(error.kind, error.message, error.extra))
        if not self.pending:
            self._idle.set()

    def _on_result(self, result: m.Result) -> None:
        entry = self.pending.pop(result.id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(result.value)
        if not self.pending:
            self._idle.set()

    def _lost(self) -> None:
        """The engine is gone: nothing it held will be answered; every waiting request hears so now."""
        self.runtime.set_ready(False)
        self.runtime.stalled = None  # a new engine starts with a clean watchdog
        pending, self.pending = self.pending, {}
        self._submits.clear()
        self._cancels.clear()
        self.ring.free = deque(range(self.ring.blocks))
        for future, _, _ in pending.values():
            if not future.done():
                future.set_exception(NotAccepting("engine process is restarting; retry shortly", "engine_unavailable"))
        self._idle.set()

    # --- what this front asks ------------------------------------------------------------------

    def _register(self, blocks: tuple[int, ...], n: int) -> tuple[int, asyncio.Future]:
        if self.outbox is None:
            raise NotAccepting("engine process is not connected; retry shortly", "engine_unavailable")
        request_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[request_id] = (future, blocks, n)
        self._idle.clear()
        return request_id, future

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """This iteration's submits (one message per model version and protocol) and cancellations."""
        self._flush_scheduled = False
        submits, self._submits = self._submits, {}
        cancels, self._cancels = self._cancels, []
        if self.outbox is None:  # the engine went away meanwhile: `_lost` answered them
            return
        for (name, version, protocol), requests in submits.items():
            rows, flat = [], []
            for request_id, blocks, n, deadline in requests:
                rows.append((request_id, len(flat), len(blocks), n, deadline))
                flat.extend(blocks)
            records = np.array(rows, m.SUBMIT)  # one conversion, not a structured write a request
            self.outbox.send(m.Submits(name, version, protocol, records, np.array(flat, np.int32)))
        if cancels:
            self.outbox.send(m.Cancels(cancels))

    async def submit(
        self, info: ModelInfo, images: np.ndarray, deadline: float, protocol: str
    ) -> tuple[np.ndarray, Timing]:
        n = len(images)
        blocks = self.ring.alloc(n)
        if blocks is None:  # this front has as many images in flight as the engine can queue
            raise QueueFull(1.0)
        self.ring.write(blocks, images)
        try:
            request_id, future = self._register(blocks, n)
        except NotAccepting:
            self.ring.release(blocks)
            raise
        self._submits.setdefault((info.name, info.version, protocol), []).append((request_id, blocks, n, deadline))
        self._schedule_flush()
        try:
            return await future
        except asyncio.CancelledError:
            if request_id in self.pending and self.outbox is not None:
                self._cancels.append(request_id)  # the blocks come back with the engine's answer
                self._schedule_flush()
            raise

    async def _ask(self, make) -> object:
        request_id, future = self._register((), 0)
        assert self.outbox is not None
        self.outbox.send(make(request_id))
        return await future

    async def statistics(self, info: ModelInfo) -> dict:
        return await self._ask(lambda i: m.Stats(i, info.name, info.version))

    # The repository API, answered by the engine process (runtime.repository is this client).

    async def index(self, ready_only: bool) -> list[dict]:
        return await self._ask(lambda i: m.Call(i, "index", (ready_only,)))

    async def load(self, name: str) -> None:
        await self._ask(lambda i: m.Call(i, "load", (name,)))

    async def unload(self, name: str) -> None:
        await self._ask(lambda i: m.Call(i, "unload", (name,)))

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
