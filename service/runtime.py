"""What every front shares: the served model, its engine and batcher, readiness, and top-k.

The fronts call `classify()` (or `submit()` for raw logits); it is the one seam between
protocols and inference, so limits, deadlines, metrics and errors behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from quicknet import store
from service import metrics
from service.backends import Backend, load_backend
from service.batcher import Batcher, NotAccepting, Timing
from service.config import Settings
from service.images import Limits

log = logging.getLogger("quicknet.service")


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


def top_k(logits: np.ndarray, k: int, labels: list[str]) -> list[list[Prediction]]:
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[Prediction(labels[i], int(i), float(p[i])) for i in row] for row, p in zip(order, probs, strict=True)]


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class Statistics:
    """Cumulative per-version counters, in the shape of KServe/Triton model statistics."""

    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)

    def record_batch(self, size: int, infer_s: float) -> None:
        self.execution_count += 1
        self.compute_infer.add(infer_s)
        self.batches.setdefault(size, Duration()).add(infer_s)


class ModelNotFound(Exception):
    """No such model or version is being served."""


class ModelRuntime:
    """One model version: its engine, its batcher, its labels, its statistics."""

    def __init__(self, version: store.ModelVersion, backend: Backend, settings: Settings):
        self.version = version
        self.backend = backend
        self.labels = version.labels
        self.stats = Statistics()
        self.batcher = Batcher(
            backend.infer,
            model=version.name,
            backend=backend.name,
            max_batch_size=min(settings.max_batch_size, backend.max_batch_size),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            preferred_batch_sizes=tuple(settings.preferred_batch_sizes),
            instances=settings.instances,
            on_batch=self.stats.record_batch,
        )

    @property
    def name(self) -> str:
        return self.version.name

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        start = time.perf_counter()
        try:
            logits, timing = await self.batcher.submit(images, deadline, protocol)
        except Exception:
            self.stats.fail.add(time.perf_counter() - start)
            raise
        self.stats.success.add(time.perf_counter() - start)
        self.stats.queue.add(timing.queue_s)
        self.stats.inference_count += len(images)
        self.stats.last_inference_ms = int(time.time() * 1000)
        metrics.IMAGES.labels(self.name, protocol).inc(len(images))
        return logits, timing

    async def classify(
        self, images: np.ndarray, deadline: float, protocol: str, k: int
    ) -> tuple[list[list[Prediction]], Timing]:
        logits, timing = await self.submit(images, deadline, protocol)
        return top_k(logits, k, self.labels), timing


class Runtime:
    """Process-wide state: settings, every served model version, readiness, draining."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = Limits(settings.max_image_bytes, settings.max_image_pixels, settings.max_images_per_request)
        self.models: dict[str, dict[int, ModelRuntime]] = {}
        self.default: ModelRuntime | None = None
        self.ready = False
        self.draining = False
        self._ready_listeners: list = []

    def serving(self, name: str | None = None, version: str | int | None = None) -> ModelRuntime:
        """The model version to run a request on, if the service is taking work: every front's one gate.
        No name: the default model (what `/classify` and the Classifier gRPC service answer with)."""
        if self.draining:
            raise NotAccepting("server is shutting down; retry on another replica", "draining")
        if not self.ready or self.default is None:
            raise NotAccepting("model is not ready yet (loading or warming up); retry shortly", "not_ready")
        return self.default if name is None else self.get(name, version)

    def get(self, name: str, version: str | int | None = None) -> ModelRuntime:
        versions = self.models.get(name)
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served (serving: {', '.join(sorted(self.models)) or 'none'})")
        if version in (None, ""):
            return versions[max(versions)]
        try:
            number = int(version)  # type: ignore[arg-type]
        except ValueError:
            raise ModelNotFound(f"model {name!r} has no version {version!r}") from None
        if number not in versions:
            have = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {number} (have: {have})")
        return versions[number]

    def all_models(self) -> list[ModelRuntime]:
        return [mr for versions in self.models.values() for _, mr in sorted(versions.items())]

    def select(self, name: str | None = None, version: str | int | None = None) -> list[ModelRuntime]:
        """Every served version; of one model; or one version (statistics scopes). Unknown: ModelNotFound."""
        if not name:
            return self.all_models()
        if version in (None, ""):
            self.get(name)
            return [mr for _, mr in sorted(self.models[name].items())]
        return [self.get(name, version)]

    def on_ready_change(self, listener) -> None:
        self._ready_listeners.append(listener)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        metrics.READY.set(1 if ready else 0)
        for listener in self._ready_listeners:
            listener(ready)

    async def load(self) -> None:
        """Load every served version and warm every batch bucket, off the event loop; then ready."""
        s = self.settings
        root = s.store_root
        default_name = s.model or store.default_model(root)
        names = list(dict.fromkeys([default_name, *(s.models or store.list_models(root))]))
        for name in names:
            versions = store.list_versions(root, name)
            if not versions:
                store.get_version(root, name)  # raises the one-line "not found" error
            for number in versions:
                await self._load_version(store.get_version(root, name, number))
        self.default = self.get(default_name, s.version)
        self._set_ready(True)

    async def _load_version(self, version: store.ModelVersion) -> None:
        store.verify_files(version)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, load_backend, version, self.settings)
        if self.settings.warmup:
            await loop.run_in_executor(None, backend.warmup)
        runtime = ModelRuntime(version, backend, self.settings)
        runtime.batcher.start()
        self.models.setdefault(version.name, {})[version.version] = runtime
        desc = backend.describe()
        metrics.MODEL_INFO.labels(version.name, str(version.version)).info(
            {"backend": backend.name, "file_sha256": _sha_of(version, desc)}
        )
        log.info(
            "loaded %s v%d on %s, warmed up in %.2fs", version.name, version.version, desc, time.perf_counter() - t0
        )

    def deadline_from_timeout_ms(self, timeout_ms: float | None) -> float:
        ms = self.settings.default_timeout_ms if timeout_ms is None else timeout_ms
        return time.monotonic() + ms / 1000

    async def drain(self) -> bool:
        self.draining = True
        self._set_ready(False)
        results = await asyncio.gather(*(m.batcher.drain(self.settings.drain_seconds) for m in self.all_models()))
        return all(results)

    async def close(self) -> None:
        for m in self.all_models():
            await m.batcher.close()


def _sha_of(version: store.ModelVersion, desc: dict) -> str:
    path = desc.get("file") or desc.get("plan") or ""
    files = version.metadata.get("files", {})
    name = path.rsplit("/", 1)[-1]
    return files.get(name, {}).get("sha256", "")
