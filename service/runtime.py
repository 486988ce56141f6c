"""What every front shares: the served model, its engine and batcher, readiness, and top-k.

The fronts call `classify()` (or `submit()` for raw logits); it is the one seam between
protocols and inference, so limits, deadlines, metrics and errors behave the same everywhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from quicknet import store
from service import metrics
from service.backends import Backend, load_backend
from service.batcher import Batcher, Timing
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


class ModelRuntime:
    """One model version: its engine, its batcher, its labels."""

    def __init__(self, version: store.ModelVersion, backend: Backend, settings: Settings):
        self.version = version
        self.backend = backend
        self.labels = version.labels
        self.batcher = Batcher(
            backend.infer,
            model=version.name,
            backend=backend.name,
            max_batch_size=min(settings.max_batch_size, backend.max_batch_size),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            preferred_batch_sizes=tuple(settings.preferred_batch_sizes),
            instances=settings.instances,
        )

    @property
    def name(self) -> str:
        return self.version.name

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        logits, timing = await self.batcher.submit(images, deadline, protocol)
        metrics.IMAGES.labels(self.name, protocol).inc(len(images))
        return logits, timing

    async def classify(
        self, images: np.ndarray, deadline: float, protocol: str, k: int
    ) -> tuple[list[list[Prediction]], Timing]:
        logits, timing = await self.submit(images, deadline, protocol)
        return top_k(logits, k, self.labels), timing


class Runtime:
    """Process-wide state: settings, the model, readiness, draining."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = Limits(settings.max_image_bytes, settings.max_image_pixels, settings.max_images_per_request)
        self.model: ModelRuntime | None = None
        self.ready = False
        self.draining = False
        self._ready_listeners: list = []

    def on_ready_change(self, listener) -> None:
        self._ready_listeners.append(listener)

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready
        metrics.READY.set(1 if ready else 0)
        for listener in self._ready_listeners:
            listener(ready)

    async def load(self) -> None:
        """Load the model and warm every batch bucket, off the event loop; then report ready."""
        s = self.settings
        root = s.store_root
        name = s.model or store.default_model(root)
        version = store.get_version(root, name, s.version)
        store.verify_files(version)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, load_backend, version, s)
        if s.warmup:
            await loop.run_in_executor(None, backend.warmup)
        self.model = ModelRuntime(version, backend, s)
        self.model.batcher.start()
        desc = backend.describe()
        metrics.MODEL_INFO.info(
            {
                "name": version.name,
                "version": str(version.version),
                "backend": backend.name,
                "file_sha256": _sha_of(version, desc),
            }
        )
        log.info(
            "serving %s v%d on %s, warmed up in %.2fs",
            version.name,
            version.version,
            desc,
            time.perf_counter() - t0,
        )
        self._set_ready(True)

    def deadline_from_timeout_ms(self, timeout_ms: float | None) -> float:
        ms = self.settings.default_timeout_ms if timeout_ms is None else timeout_ms
        return time.monotonic() + ms / 1000

    async def drain(self) -> bool:
        self.draining = True
        self._set_ready(False)
        if self.model is None:
            return True
        finished = await self.model.batcher.drain(self.settings.drain_seconds)
        return finished

    async def close(self) -> None:
        if self.model is not None:
            await self.model.batcher.close()


def _sha_of(version: store.ModelVersion, desc: dict) -> str:
    path = desc.get("file") or desc.get("plan") or ""
    files = version.metadata.get("files", {})
    name = path.rsplit("/", 1)[-1]
    return files.get(name, {}).get("sha256", "")
