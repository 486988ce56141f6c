"""The process's CPU cores, shared by every CPU engine in it, in arrival order.

Each model version's ONNX Runtime session has `--threads` intra-op threads of its own, and ORT
sizes nothing across sessions: two models busy at once on 2 cores with 2 threads each ran 4
spinning threads on 2 cores, and a thread that spins at each operator's end waiting for a
descheduled peer loses what it waits. Measured here (`python -m benchmarks.shared_cores`, both
published models, Xeon 2 cores): busy together they served 0.69-0.78 of their rates alone, at
batch 64 and at one image; taking turns, 0.93-1.08; the full model's p99 a call went from ~355 to
~170 ms at batch 64 and from 12-15 to 4-5 ms at one image.

So a CPU run takes its threads' worth of the process's cores (`usable_cores()`: affinity, capped
by a cgroup CPU limit) and waits, first come first served, while they are taken. One model alone
is not slowed (an uncontended hold is a lock and a comparison); `--instances` x `--threads`
within the cores still run side by side.

What it costs: a run waits for the runs ahead of it, whichever model they are for, so quicknet-xs
at batch 64 went from ~80-100 ms p99 beside the full model to ~170 (it waits for a batch of the
full model, ~0.13 s here, where it used to share the cores with it). The turns are per run, not
per second: at equal batch sizes both models get equal images, not equal time.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from quicknet.serve import metrics
from quicknet.serve.config import usable_cores


class CoreGate:
    """A counting semaphore over `cores`, weighted by the threads a run uses, handed over in
    arrival order: a release gives the cores to the waiter at the head (never to a thread that
    arrives later and would take them first, which a plain semaphore allows and which starved
    the faster model outright when tried: 11 img/s against its 2,900 alone)."""

    def __init__(self, cores: int):
        self.cores = max(1, cores)
        self._free = self.cores
        self._waiting: deque[tuple[int, threading.Lock]] = deque()
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, threads: int) -> Iterator[None]:
        """Run the body with `threads` cores taken (at most all of them)."""
        need = min(max(1, threads), self.cores)
        with self._lock:
            if not self._waiting and self._free >= need:
                self._free -= need
                turn = None
            else:
                turn = threading.Lock()
                turn.acquire()
                self._waiting.append((need, turn))
        if turn is not None:
            waited = time.perf_counter()
            turn.acquire()  # released by the run that hands us its cores
            metrics.CPU_WAIT.inc(time.perf_counter() - waited)  # an operator's sign of models contending
        try:
            yield
        finally:
            self._release(need)

    def _release(self, n: int) -> None:
        with self._lock:
            self._free += n
            while self._waiting and self._free >= self._waiting[0][0]:
                need, turn = self._waiting.popleft()
                self._free -= need
                turn.release()

    @property
    def waiting(self) -> int:
        return len(self._waiting)


_gate: CoreGate | None = None
_made = threading.Lock()


def gate() -> CoreGate:
    """The process's gate, sized at first use."""
    global _gate
    if _gate is None:
        with _made:
            if _gate is None:
                _gate = CoreGate(usable_cores())
    return _gate


def _forget() -> None:
    """A forked child starts with a gate of its own: its parent's runs are not its own."""
    global _gate, _made
    _gate, _made = None, threading.Lock()


os.register_at_fork(after_in_child=_forget)
