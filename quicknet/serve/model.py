"""What a front sees of a served model version, wherever its engine runs.

`ModelInfo` is static and crosses process boundaries. A `ModelHandle` adds the one call that
matters, `submit(images, deadline, protocol) -> (logits, Timing)`, and `statistics()`. The
engine may live in this process (`quicknet.serve.engine.LocalModel`) or in the engine process
(`quicknet.serve.sources.remote.RemoteModel`): the fronts cannot tell the difference.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from quicknet.serve import tracing
from quicknet.serve.batcher import Timing
from quicknet.serve.transport import access


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int
    labels: tuple[str, ...]
    metadata: dict  # the store's metadata.json
    backend: str
    description: dict  # the backend's describe(), for /v1/models (no server paths)
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    max_queue_delay_s: float = 0.0


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    score: float

    def to_dict(self) -> dict:
        return {"label": self.label, "index": self.index, "score": round(self.score, 6)}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


SMALL_BATCH = 8  # rows up to which `top_k` runs in plain Python


def top_k(logits: np.ndarray, k: int, labels: tuple[str, ...] | list[str]) -> list[list[Prediction]]:
    """The `k` likeliest classes of each row, likeliest first (ties: the lower index first).
    A few rows of 10 logits run in plain Python: numpy's per-call overhead made one image's top-5
    ~90 us of the event loop in service (caches cold after the engine's run), plain Python ~10;
    both are float64 softmax, the same order (tests/test_runtime.py checks them against each other)."""
    if len(logits) <= SMALL_BATCH:
        return [_top_k_row(row, k, labels) for row in logits.tolist()]
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[Prediction(labels[i], int(i), float(p[i])) for i in row] for row, p in zip(order, probs, strict=True)]


def _top_k_row(row: list[float], k: int, labels) -> list[Prediction]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    total = sum(e)
    order = sorted(range(len(e)), key=e.__getitem__, reverse=True)[:k]  # stable: ties keep index order
    return [Prediction(labels[i], i, e[i] / total) for i in order]


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)

    def to_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass
class Statistics:
    """Cumulative per-version counters with Triton's semantics (what perf_analyzer checks):
    `inference_stats` count requests — success, fail, queue and the three compute phases each once
    per successful request, so their counts agree; `batch_stats` count executions per batch size;
    `inference_count` counts images, `execution_count` engine batches. Thread-safe: the engine
    core records from its runner threads while the event loop reads."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, tuple[Duration, Duration, Duration]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_failures(self, seconds: float, count: int = 1) -> None:
        """`count` requests refused or failed, `seconds` between them (Triton's `fail`)."""
        with self._lock:
            self.fail.add(seconds, count)

    def record_request(self, images: int, seconds: float, timing: Timing, now_ms: int) -> None:
        with self._lock:
            self.success.add(seconds)
            self.queue.add(timing.queue_s)
            self.compute_input.add(timing.input_s)
            self.compute_infer.add(timing.infer_s)
            self.compute_output.add(timing.output_s)
            self.inference_count += images
            self.last_inference_ms = now_ms

    def record_requests(self, queued_s: list[float], images: int, input_s: float, infer_s: float, output_s: float):
        """Many requests answered by one batch at once (`record_request`'s sums, one call a batch)."""
        k, compute_s = len(queued_s), input_s + infer_s + output_s
        with self._lock:
            self.queue.add(sum(queued_s), k)
            self.success.add(sum(queued_s) + k * compute_s, k)
            self.compute_input.add(k * input_s, k)
            self.compute_infer.add(k * infer_s, k)
            self.compute_output.add(k * output_s, k)
            self.inference_count += images
            self.last_inference_ms = int(time.time() * 1000)

    def record_batch(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        with self._lock:
            self.execution_count += 1
            phases = self.batches.setdefault(size, (Duration(), Duration(), Duration()))
            for phase, seconds in zip(phases, (input_s, infer_s, output_s), strict=True):
                phase.add(seconds)

    def to_dict(self) -> dict:
        with self._lock:
            return self._to_dict()

    def _to_dict(self) -> dict:
        return {
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "last_inference": self.last_inference_ms,
            "inference_stats": {
                "success": self.success.to_dict(),
                "fail": self.fail.to_dict(),
                "queue": self.queue.to_dict(),
                "compute_input": self.compute_input.to_dict(),
                "compute_infer": self.compute_infer.to_dict(),
                "compute_output": self.compute_output.to_dict(),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": phases[0].to_dict(),
                    "compute_infer": phases[1].to_dict(),
                    "compute_output": phases[2].to_dict(),
                }
                for size, phases in sorted(self.batches.items())
            ],
        }


class ModelHandle:
    """The face every front uses. Subclasses implement `submit` and `statistics`."""

    info: ModelInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def labels(self) -> tuple[str, ...]:
        return self.info.labels

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        raise NotImplementedError

    async def statistics(self) -> dict:
        raise NotImplementedError

    def admit(self) -> None:
        """Raise QueueFull now if a request could not be queued (checked before its body is read)."""

    async def run(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        """`submit`, recording the request's `queue` and `infer` spans when tracing is on: what
        every front calls."""
        started = time.time_ns()
        access.note_run(self.name, self.version, len(images))  # the access log's model, version, images
        logits, timing = await self.submit(images, deadline, protocol)
        tracing.record_batching(started, timing, len(images))
        return logits, timing

    async def classify(
        self, images: np.ndarray, deadline: float, protocol: str, k: int
    ) -> tuple[list[list[Prediction]], Timing]:
        logits, timing = await self.run(images, deadline, protocol)
        return top_k(logits, k, self.labels), timing
