"""The engine process's door: accepts front processes over a Unix socket, hands each front's
shared memory to the engine core (`engine_core.py`, which serves its requests), and answers
what crosses the socket (`messages.py`): the engine's state, statistics, the repository API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket

from quicknet.serve import messages as m
from quicknet.serve.engine_core import EngineCore, Front
from quicknet.serve.errors import ModelNotFound, Refusal, RepositoryError, to_wire
from quicknet.serve.ipc import Outbox, Ring, read_message, unframe

log = logging.getLogger("quicknet.ipc")

FD_CLOSE_DELAY_S = 1.0  # a runner may be polling a gone front's doorbell: close it after
SYNC_TIMEOUT_S = 5.0  # a repository call waits at most this for every front to serve the new state


class EngineServer:
    """The engine process's side: accepts fronts; their requests go to `core`."""

    def __init__(self, path: str, engine, core: EngineCore):
        self.path = path
        self.engine = engine  # quicknet.serve.engine.Engine: the served versions and their lifecycle
        self.core = core
        self.ready = False
        self.stalled: str | None = None
        self.outboxes: set[Outbox] = set()
        self.sock: socket.socket | None = None
        self._accepting_task: asyncio.Task | None = None
        self._front_tasks: set[asyncio.Task] = set()
        self._calls: set[asyncio.Task] = set()
        self.generation = 0
        self._seen: dict[Outbox, int] = {}  # each front's latest state served
        self._seen_changed = asyncio.Event()

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
        self.ready = False
        self.core.stop_accepting()
        self._broadcast()

    def set_stalled(self, reason: str | None) -> None:
        """The watchdog's verdict, for every front's liveness."""
        self.stalled = reason
        for outbox in self.outboxes:
            outbox.send(m.Stalled(reason))

    def _state(self) -> m.State:
        """The engine's state now, as generation `self.generation` (a broadcast makes a new one)."""
        models = self.engine.models
        keys = [model.batcher.key for model in models]
        return m.State(self.ready, [model.info for model in models], self.engine.default_name, keys, self.generation)

    def _on_seen(self, outbox: Outbox, generation: int) -> None:
        self._seen[outbox] = generation
        self._seen_changed.set()

    def _on_gone(self, outbox: Outbox) -> None:
        self.outboxes.discard(outbox)
        self._seen.pop(outbox, None)
        self._seen_changed.set()  # a repository call waiting on it waits no more

    async def _fronts_serve_current_state(self) -> None:
        """Until every connected front has said it serves the latest state (at most SYNC_TIMEOUT_S)."""
        target = self.generation
        deadline = asyncio.get_running_loop().time() + SYNC_TIMEOUT_S
        while any(self._seen.get(outbox, 0) < target for outbox in self.outboxes):
            self._seen_changed.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                log.warning("a front did not confirm the engine's state %d in %.0fs", target, SYNC_TIMEOUT_S)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._seen_changed.wait(), remaining)

    def _broadcast(self) -> None:
        self.generation += 1
        state = self._state()
        for outbox in self.outboxes:
            outbox.send(state)

    async def _accept_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            task = asyncio.create_task(self._serve_front(conn))
            self._front_tasks.add(task)
            task.add_done_callback(self._front_tasks.discard)

    async def _serve_front(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            raw, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 1 << 16, 3)
            conn.setblocking(False)
            hello = unframe(raw)
            if not isinstance(hello, m.Hello) or len(fds) != 3:
                raise ValueError(f"expected Hello with 3 descriptors, got {type(hello).__name__} with {len(fds)}")
            ring = Ring(fds[0], hello.blocks)
            os.close(fds[0])  # the mapping keeps the memory; the descriptor is no longer needed
        except (OSError, ValueError, IndexError, pickle.UnpicklingError) as e:
            log.warning("a front failed its handshake: %s", e)
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            conn.close()
            return
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_unix_connection(sock=conn)
        outbox = Outbox(writer)

        def fail(blocks: list[int], refusal: Refusal) -> None:  # from a runner thread
            loop.call_soon_threadsafe(outbox.send, m.Failed(blocks, *to_wire(refusal)))

        front = Front(ring, fds[1], fds[2], hello.pid, fail)
        self.core.add_front(front)
        self.outboxes.add(outbox)
        outbox.send(self._state())
        if self.stalled:
            outbox.send(m.Stalled(self.stalled))
        log.info("front process %d connected", hello.pid)
        try:
            while True:
                message = await read_message(reader)
                if isinstance(message, m.Seen):
                    self._on_seen(outbox, message.generation)
                elif isinstance(message, m.Stats):
                    await self._stats(outbox, message)
                elif isinstance(message, m.RepositoryCall):
                    task = asyncio.create_task(self._repository_call(outbox, message))
                    self._calls.add(task)
                    task.add_done_callback(self._calls.discard)
                else:
                    log.warning("front process %d sent an unknown message %s", hello.pid, type(message).__name__)
        except (OSError, asyncio.IncompleteReadError, EOFError):
            log.info("front process %d disconnected", hello.pid)
        finally:
            self._on_gone(outbox)
            self.core.remove_front(front)
            loop.call_later(FD_CLOSE_DELAY_S, _close, fds[1], fds[2])
            writer.close()

    async def _repository_call(self, outbox: Outbox, call: m.RepositoryCall) -> None:
        """index / load / unload on the engine, for a front's repository API."""
        try:
            match call:
                case m.Index(ready_only=ready_only):
                    result = self.engine.index(ready_only)
                case m.Load(name=name):
                    result = await self.engine.load_model(name)
                    await self._fronts_serve_current_state()
                case m.Unload(name=name):
                    result = await self.engine.unload_model(name)
                    await self._fronts_serve_current_state()
        except Refusal as e:
            outbox.send(m.Error(call.id, *to_wire(e)))
        except Exception:  # a bug: the front still gets its answer (one line), never a request left waiting
            what = type(call).__name__.lower()
            log.exception("repository %s failed in the engine process", what)
            failed = RepositoryError(f"repository {what} failed; see the server log")
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


def _close(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
