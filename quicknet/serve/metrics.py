"""Every Prometheus metric the service exports, defined once. Other modules record, never define.

Conventions: base units (seconds), counters end in `_total`, latency as histograms so they
aggregate across replicas.

With front processes (`--workers` > 1) every process writes its samples to files under
`PROMETHEUS_MULTIPROC_DIR` (the supervisor sets it before any child starts) and `/metrics` in
any front merges them: one view of the whole service. Gauges say how to merge (`multiprocess_mode`):
the engine process alone sets the queue, in-flight, model and GPU gauges; `quicknet_ready` is
the minimum over the live fronts, so it is 1 only when every front takes work.
"""

from __future__ import annotations

import os
from contextvars import ContextVar

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as _values

# In multiprocess mode prometheus-client asks os.getpid() on every sample it writes, to notice a
# fork: a system call each time, ~10 a request in the engine process alone, and system calls are
# what a gVisor sandbox (where the GPU machines may run) makes dearest. The pid is asked once per
# process instead, and again in a forked child, which is all the check needs. Before any metric.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))
if _values.ValueClass is not _values.MutexValue:  # PROMETHEUS_MULTIPROC_DIR was set at import
    _values.ValueClass = _values.MultiProcessValue(process_identifier=lambda: _PID[0])

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUEST_SECONDS = Histogram(
    "quicknet_request_duration_seconds",
    "Time from request received to response ready.",
    ["protocol", "endpoint", "code", "model", "version"],
    buckets=LATENCY_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "quicknet_decode_duration_seconds",
    "Time to decode and resize one request's images.",
    ["protocol"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "quicknet_queue_wait_seconds", "Time an item waited in the batcher queue.", ["model"], buckets=LATENCY_BUCKETS
)
INFER_SECONDS = Histogram(
    "quicknet_inference_duration_seconds", "Engine time for one batch.", ["model", "backend"], buckets=LATENCY_BUCKETS
)
BATCH_SIZE = Histogram("quicknet_batch_size", "Images per engine batch.", ["model"], buckets=BATCH_BUCKETS)
IMAGES = Counter("quicknet_images_total", "Images classified.", ["model", "protocol"])
REJECTIONS = Counter(
    "quicknet_rejections_total", "Requests refused or dropped, by reason.", ["protocol", "reason", "model", "version"]
)
QUEUE_DEPTH = Gauge(
    "quicknet_queue_images", "Images waiting in the batcher queue.", ["model"], multiprocess_mode="livesum"
)
IN_FLIGHT = Gauge(
    "quicknet_batches_in_flight", "Batches running on the engine.", ["model"], multiprocess_mode="livesum"
)
ENGINE_CORE_CPU = Counter(
    "quicknet_engine_core_cpu_seconds",
    "CPU the engine core's runner threads spent outside the engine call (collecting, batching, "
    "answering), with front processes.",
    ["model"],
)
CPU_WAIT = Counter(
    "quicknet_cpu_wait_seconds",
    "Time ONNX Runtime CPU runs waited for the process's cores while another model's run held them "
    "(counted in that batch's engine time too).",
)
READY = Gauge("quicknet_ready", "1 when the service is warmed up and accepting work.", multiprocess_mode="livemin")
ENGINE_STALLED = Gauge(
    "quicknet_engine_stalled",
    "1 while an engine batch has run past the watchdog limit (the service reports not live).",
    multiprocess_mode="livemax",
)
MODEL_INFO = Gauge(
    "quicknet_model_info",
    "A model version being served (1; 0 once unloaded).",
    ["name", "version", "backend", "file_sha256"],
    multiprocess_mode="livemax",
)
MODEL_STATE = Gauge(
    "quicknet_model_state",
    "1 for each model version's current state (LOADING, READY, UNLOADING, UNAVAILABLE), else 0.",
    ["name", "version", "state"],
    multiprocess_mode="livemax",
)
MODEL_STATES = ("LOADING", "READY", "UNLOADING", "UNAVAILABLE")
MODEL_LOADS = Counter("quicknet_model_loads_total", "Model version loads, by outcome.", ["name", "outcome"])
MODEL_UNLOADS = Counter("quicknet_model_unloads_total", "Model versions unloaded.", ["name"])
GPU_UTILIZATION = Gauge(
    "quicknet_gpu_utilization_ratio", "GPU busy fraction (NVML).", ["gpu"], multiprocess_mode="livemax"
)
GPU_MEMORY_USED = Gauge(
    "quicknet_gpu_memory_used_bytes", "GPU memory in use (NVML).", ["gpu"], multiprocess_mode="livemax"
)


# The (model, version) the current request runs on, once the runtime picked it, so request and
# rejection metrics carry it (bounded: only served versions). Each request runs in its own task.
SERVED: ContextVar[tuple[str, str]] = ContextVar("served", default=("", ""))


class BatcherSeries:
    """A batcher's series for one model version, looked up once (`labels()` takes a lock and
    validates its values on every call); both batchers (`batcher.py`, `engine_core.py`) keep one."""

    __slots__ = ("batch", "depth", "in_flight", "infer", "queued")

    def __init__(self, model: str, backend: str) -> None:
        self.depth = QUEUE_DEPTH.labels(model)
        self.queued = QUEUE_SECONDS.labels(model)
        self.in_flight = IN_FLIGHT.labels(model)
        self.infer = INFER_SECONDS.labels(model, backend)
        self.batch = BATCH_SIZE.labels(model)


# Per-request series, looked up once: `labels()` takes a lock and validates its values on every
# call (~3 us, three times a request). Their labels are bounded (protocols, routes, status codes,
# served versions), so are these.
_REQUEST_SERIES: dict[tuple[str, ...], object] = {}
_REJECTION_SERIES: dict[tuple[str, ...], object] = {}


def _series(cache: dict, metric, key: tuple[str, ...]):
    series = cache.get(key)
    if series is None:
        series = cache[key] = metric.labels(*key)
    return series


def request_done(protocol: str, endpoint: str, code: str, seconds: float) -> None:
    _series(_REQUEST_SERIES, REQUEST_SECONDS, (protocol, endpoint, code, *SERVED.get())).observe(seconds)


def rejected(protocol: str, reason: str) -> None:
    _series(_REJECTION_SERIES, REJECTIONS, (protocol, reason, *SERVED.get())).inc()


def exposition() -> tuple[bytes, str]:
    """The text `/metrics` serves: this process's registry, or every process's when multiprocess."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def observe_many(histogram, values) -> None:
    """`histogram.observe(v)` for every v of a numpy array, in one pass: the engine core observes
    a batch's queue waits at once. Uses the child's own buckets and sum (prometheus-client is
    pinned; tests/test_engine_core.py checks this against `observe`, value by value)."""
    if not len(values):
        return
    bounds = histogram._upper_bounds
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum()))
    for i in np.flatnonzero(counts).tolist():
        histogram._buckets[i].inc(int(counts[i]))
