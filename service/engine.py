"""The engine side: every served model version loaded in this process, each with its backend
(the engine library) and its dynamic batcher.

It runs inside the single server process (`--workers 1`) or alone in the engine process that N
front processes feed (`service.ipc`). Either way the fronts reach it through `ModelHandle`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np

from quicknet import store
from service import metrics
from service.backends import Backend, load_backend
from service.batcher import Batcher, DeadlineExceeded, EngineFailure, NotAccepting, QueueFull, Timing
from service.config import Settings
from service.model import ModelHandle, ModelInfo, Statistics

log = logging.getLogger("quicknet.service")


class LocalModel(ModelHandle):
    """One model version in this process: its engine, its batcher, its statistics."""

    def __init__(self, version: store.ModelVersion, backend: Backend, settings: Settings):
        self.version_record = version
        self.backend = backend
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
        description = {
            k: (Path(v).name if k in ("file", "plan") and isinstance(v, str) else v)  # no server paths to clients
            for k, v in backend.describe().items()
        }
        self.info = ModelInfo(
            name=version.name,
            version=version.version,
            labels=tuple(version.labels),
            metadata=version.metadata,
            backend=backend.name,
            description=description,
            max_batch_size=self.batcher.max_batch_size,
            preferred_batch_sizes=self.batcher.preferred,
            instances=self.batcher.instances,
            max_queue_delay_s=self.batcher.max_queue_delay_s,
        )

    async def submit(self, images: np.ndarray, deadline: float, protocol: str) -> tuple[np.ndarray, Timing]:
        start = time.perf_counter()
        try:
            logits, timing = await self.batcher.submit(images, deadline, protocol)
        except (QueueFull, DeadlineExceeded, NotAccepting):
            self.stats.fail.add(time.perf_counter() - start)
            raise
        except Exception as e:  # the engine raised on this batch: one line with its reason, the next batch runs
            self.stats.fail.add(time.perf_counter() - start)
            log.error("engine failed on a batch of %s v%d: %r", self.name, self.version, e)
            raise EngineFailure(f"{type(e).__name__}: {e}") from e
        self.stats.record_request(len(images), time.perf_counter() - start, timing, int(time.time() * 1000))
        metrics.IMAGES.labels(self.name, protocol).inc(len(images))
        return logits, timing

    async def statistics(self) -> dict:
        return self.stats.to_dict()


class Engine:
    """Loads every served version (verified, warmed), then batches and runs their requests."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.models: list[LocalModel] = []
        self.default_name: str | None = None

    def plan(self) -> tuple[str, list[tuple[str, int]]]:
        """The default model and every (model, version) to load, checked against the store before
        anything loads: a wrong name fails in one line, not after minutes of warm-up."""
        s = self.settings
        root = s.store_root
        default_name = s.model or store.default_model(root)
        names = list(dict.fromkeys([default_name, *(s.models or store.list_models(root))]))
        wanted = []
        for name in names:
            versions = store.list_versions(root, name)
            if not versions:
                store.get_version(root, name)  # raises the one-line "not found" error
            wanted += [(name, v) for v in versions]
        if s.version is not None and (default_name, s.version) not in wanted:
            store.get_version(root, default_name, s.version)  # raises "no version N (have: ...)"
        return default_name, wanted

    async def load(self) -> list[LocalModel]:
        default_name, wanted = self.plan()
        for name, number in wanted:
            self.models.append(await self._load_version(store.get_version(self.settings.store_root, name, number)))
        self.default_name = default_name
        return self.models

    async def _load_version(self, version: store.ModelVersion) -> LocalModel:
        store.verify_files(version)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        backend = await loop.run_in_executor(None, load_backend, version, self.settings)
        if self.settings.warmup:
            await loop.run_in_executor(None, backend.warmup)
        if self.settings.fault_injection:
            from service.backends.faults import FaultPlan, FaultyBackend

            spec = self.settings.fault_injection
            backend = FaultyBackend(backend, FaultPlan.parse(spec), spec)
            log.warning("fault injection on %s v%d: %s", version.name, version.version, spec)
        model = LocalModel(version, backend, self.settings)
        model.batcher.start()
        files = version.metadata.get("files", {})
        served_file = model.info.description.get("file") or model.info.description.get("plan") or ""
        metrics.MODEL_INFO.labels(
            version.name, str(version.version), backend.name, files.get(served_file, {}).get("sha256", "")
        ).set(1)
        log.info(
            "loaded %s v%d on %s, warmed up in %.2fs",
            version.name,
            version.version,
            model.info.description,
            time.perf_counter() - t0,
        )
        return model

    async def drain(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(m.batcher.drain(timeout_s) for m in self.models))
        return all(results)

    async def close(self) -> None:
        for m in self.models:
            await m.batcher.close()
