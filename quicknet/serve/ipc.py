"""The seam between front processes and the engine process (`--workers` > 1): the shared
memory a front shares with the engine (`Ring`), what a record's answer status means, and the
socket's framing. The front's side is `sources/remote.py`; the engine's, `engine_core.py` (the
requests) and `engine_server.py` (the connections and everything else).

Requests never cross the socket: a front writes a request's pixels and its record (id, model
version's key, images, deadline, protocol) into a block of its ring, puts the block's number on
the ring's submission queue and rings the engine's doorbell (an eventfd) only when the engine
is parked; the engine answers in the same block (logits, status, timings), puts the block on
the completion queue and signals the front's bell once a batch. Everything else (the engine's
state, statistics, the repository API, an engine failure's words) crosses the Unix socket as the
typed messages of `messages.py`, length-prefixed and pickled; the ring's memfd and both eventfds
cross it once, in the front's Hello.

The engine answers every published block exactly once (a cancelled one too), and a front reuses
a block only after that answer, so the engine never reads or writes a block that was handed to
another request. Deadlines are `time.monotonic()`, one clock for every process. If the engine
goes away, every waiting request is answered 503 / UNAVAILABLE at once and the front turns
unready until a new engine is up and warm.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import pickle
import platform
import struct
import threading
from collections import deque

import numpy as np

from quicknet.serve.errors import DeadlineExceeded, EngineFailure, ModelNotFound, NotAccepting, QueueFull, Refusal

BLOCK_IMAGES = 16
IMAGE_BYTES = 32 * 32 * 3
LOGIT_BYTES = 10 * 4
_LENGTH = struct.Struct("<I")


# One record a block, written by the front before it publishes the block: its request's id, the
# deadline, the model version's key (`messages.State.keys`), images, which part of its request
# (a request larger than a block is split), the protocol (an index into PROTOCOLS), and the
# front's cancel flag (its client went away or its deadline passed: skip it if still queued).
REQUEST = np.dtype(
    [
        ("id", "<i8"),
        ("deadline", "<f8"),
        ("model", "<i4"),
        ("n", "<i4"),
        ("part", "<i4"),
        ("protocol", "<i4"),
        ("cancel", "<i4"),
    ]
)
# Its answer, written by the engine: a status (below) and the request's time in the engine.
ANSWER = np.dtype(
    [
        ("status", "<i4"),
        ("retry_after", "<f4"),
        ("queue_s", "<f4"),
        ("infer_s", "<f4"),
        ("input_s", "<f4"),
        ("output_s", "<f4"),
    ]
)
# Answer statuses. QUEUED and RUNNING are states (the front's deadline timer reads them); the rest
# are answers. An engine failure carries a message, so it travels over the socket (`messages.Failed`).
QUEUED, RUNNING, OK, DEADLINE, CANCELLED, QUEUE_FULL, NOT_ACCEPTING, NOT_FOUND = range(-2, 6)
# The protocol tags a record can carry (the engine's metrics count images by them).
PROTOCOLS = ("rest", "grpc", "kserve-rest", "kserve-grpc", "web", "other")

# The control words, a cache line apart: the front's submission tail, the engine's "ring me" flag.
_SUB_TAIL, _IDLE = 0, 8
_ALIGN = 64

# x86-64 keeps stores in order (TSO), so a front may publish a record by storing the queue's tail
# and ring only when the engine is parked. Elsewhere stores may be seen out of order: the front
# rings for every publication, passing the count through the eventfd (the kernel orders it).
TAIL_IN_MEMORY = platform.machine() in ("x86_64", "AMD64")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier: a lock's atomic exchange (`lock cmpxchg` on x86). Between a side's
    store of its own word and its load of the other's (the tail and the idle flag): without it,
    both could read the old value and a doorbell would be missed."""
    _FENCE.acquire()
    _FENCE.release()


class Ring:
    """A front's shared memory, in one memfd: per block of BLOCK_IMAGES images a request record
    and an answer; a submission queue (front -> engine) and a completion queue (engine -> front)
    of block numbers; the pixels and their logits.

    A block is one request record (a front splits a larger request into block-sized parts), in
    flight from the front's publication until the engine's answer; each queue holds every block
    at most once, so neither can overflow. The submission queue's tail lives in this memory (on
    x86-64) and the engine reads it whenever it looks; the completion queue's count travels
    through the front's bell (an eventfd) with the engine's signal, once a batch."""

    def __init__(self, fd: int, blocks: int):
        self.fd = fd
        self.blocks = blocks
        offsets, size = self._layout(blocks)
        self.memory = mmap.mmap(fd, size)
        buf = self.memory
        self.control = np.ndarray((16,), np.int64, buf, offset=offsets["control"])
        self.sub = np.ndarray((blocks,), np.int32, buf, offset=offsets["sub"])
        self.comp = np.ndarray((blocks,), np.int32, buf, offset=offsets["comp"])
        self.requests = np.ndarray((blocks,), REQUEST, buf, offset=offsets["requests"])
        self.answers = np.ndarray((blocks,), ANSWER, buf, offset=offsets["answers"])
        self.pixels = np.ndarray((blocks, BLOCK_IMAGES, 32, 32, 3), np.uint8, buf, offset=offsets["pixels"])
        self.logits = np.ndarray((blocks, BLOCK_IMAGES, 10), np.float32, buf, offset=offsets["logits"])
        self.free: deque[int] = deque(range(blocks))

    @staticmethod
    def _layout(blocks: int) -> tuple[dict[str, int], int]:
        parts = [
            ("control", 16 * 8),
            ("sub", blocks * 4),
            ("comp", blocks * 4),
            ("requests", blocks * REQUEST.itemsize),
            ("answers", blocks * ANSWER.itemsize),
            ("pixels", blocks * BLOCK_IMAGES * IMAGE_BYTES),
            ("logits", blocks * BLOCK_IMAGES * LOGIT_BYTES),
        ]
        offsets, at = {}, 0
        for name, nbytes in parts:
            offsets[name] = at
            at += _aligned(nbytes)
        return offsets, at

    @classmethod
    def create(cls, images: int) -> Ring:
        blocks = max(1, -(-images // BLOCK_IMAGES))
        fd = os.memfd_create("quicknet-ring", os.MFD_CLOEXEC)
        os.ftruncate(fd, cls._layout(blocks)[1])
        return cls(fd, blocks)

    def reset(self) -> None:
        """A new engine: every block free, both queues empty (the front's side, before its Hello)."""
        self.free = deque(range(self.blocks))
        self.control[:] = 0

    # --- the submission queue's tail and the engine's flag -----------------------------------

    @property
    def sub_tail(self) -> int:
        return int(self.control[_SUB_TAIL])

    @sub_tail.setter
    def sub_tail(self, value: int) -> None:
        self.control[_SUB_TAIL] = value

    @property
    def engine_idle(self) -> bool:
        return bool(self.control[_IDLE])

    @engine_idle.setter
    def engine_idle(self, value: bool) -> None:
        self.control[_IDLE] = 1 if value else 0

    def positions(self, start: int, count: int) -> np.ndarray:
        """Queue slots for `count` entries from the running count `start` (slots wrap)."""
        return np.arange(start, start + count) % self.blocks


def frame(message: object) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


def unframe(raw: bytes) -> object:
    """The first message of `raw` (the Hello, read with its descriptors)."""
    (length,) = _LENGTH.unpack_from(raw)
    return pickle.loads(raw[_LENGTH.size : _LENGTH.size + length])


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


def refusal_for(status: int, retry_after: float, model: str, version: int) -> Refusal:
    """What a record's answer status means, as the refusal a front answers its client with."""
    if status == DEADLINE:
        return DeadlineExceeded("deadline exceeded while queued")
    if status == QUEUE_FULL:
        return QueueFull(retry_after)
    if status == NOT_ACCEPTING:
        return NotAccepting("engine is shutting down; retry shortly", "draining")
    if status == NOT_FOUND:
        return ModelNotFound(f"model {model!r} v{version} is not served")
    return EngineFailure("cancelled" if status == CANCELLED else f"unknown answer status {status}")
