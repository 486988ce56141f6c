"""The engine side: every served model version loaded in this process, each with its backend
(the engine library) and its dynamic batcher.

It runs inside the single server process (`--workers 1`, each version batched by `batcher.py`) or
alone in the engine process that N front processes feed (`--workers` > 1, each version batched by
the engine core, `engine_core.py`). Either way the fronts reach it through `ModelHandle`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet import store
from quicknet.errors import QuickNetError, StoreError
from quicknet.serve import metrics
from quicknet.serve.backends import Backend, choose, load_backend
from quicknet.serve.batcher import Batcher, Timing
from quicknet.serve.config import Settings, parse_policy
from quicknet.serve.engine_core import EngineCore, Lane
from quicknet.serve.errors import (
    DeadlineExceeded,
    EngineFailure,
    ModelNotFound,
    NotAccepting,
    QueueFull,
    RepositoryError,
)
from quicknet.serve.model import ModelHandle, ModelInfo, Statistics

log = logging.getLogger("quicknet.service")


class LocalModel(ModelHandle):
    """One model version in this process: its engine, its batcher, its statistics."""

    def __init__(
        self, version: store.ModelVersion, backend: Backend, settings: Settings, core: EngineCore | None = None
    ):
        self.version_record = version
        self.backend = backend
        self.stats = Statistics()
        self._images: dict[str, object] = {}  # quicknet_images_total's series, by protocol
        policy = dict(
            model=version.name,
            backend=backend.name,
            max_batch_size=min(settings.max_batch_size, backend.max_batch_size),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_s=settings.max_queue_delay_ms / 1000,
            preferred_batch_sizes=tuple(settings.preferred_batch_sizes),
            instances=settings.instances,
        )
        # the engine process: the engine core's lane (requests from the fronts' shared memory);
        # one process: the asyncio batcher. Either is this version's one dynamic batcher.
        self.batcher: Batcher | Lane = (
            core.lane(backend.infer, stats=self.stats, **policy)
            if core is not None
            else Batcher(backend.infer, on_batch=self.stats.record_batch, **policy)
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
            self.stats.record_failures(time.perf_counter() - start)
            raise
        except Exception as e:  # the engine raised on this batch: one line with its reason, the next batch runs
            self.stats.record_failures(time.perf_counter() - start)
            log.error("engine failed on a batch of %s v%d: %r", self.name, self.version, e)
            raise EngineFailure(f"{type(e).__name__}: {e}") from e
        self.stats.record_request(len(images), time.perf_counter() - start, timing, int(time.time() * 1000))
        series = self._images.get(protocol)
        if series is None:  # looked up once a protocol (`labels()` locks and validates per call)
            series = self._images[protocol] = metrics.IMAGES.labels(self.name, protocol)
        series.inc(len(images))
        return logits, timing

    async def statistics(self) -> dict:
        return self.stats.to_dict()

    def admit(self) -> None:
        self.batcher.admit()

    async def close(self) -> None:
        await self.batcher.close()
        metrics.MODEL_INFO.labels(*self._info_labels).set(0)  # multiprocess files keep series: zero, not remove


VersionKey = tuple[str, int]


def pick_versions(available: list[int], policy: str) -> list[int]:
    kind, numbers = parse_policy(policy)
    if kind == "all":
        return list(available)
    if kind == "latest":
        return sorted(available)[-numbers[0] :]
    return [v for v in available if v in numbers]


@dataclass
class VersionState:
    """Where a version stands, as the repository index reports it (Triton's words)."""

    state: str  # LOADING, READY, UNLOADING, UNAVAILABLE
    reason: str = ""
    stamp: tuple = ()  # UNAVAILABLE: the version's folder as the failed load found it (store.version_stamp)


class Engine:
    """The served versions and their lifecycle: load (verify, engine, warm-up) then READY; a
    version that leaves the desired set stops taking new work, finishes what it has, and is closed.

    What is desired: every model in the store (or `--models`), each version its policy picks
    (`--version-policy`, `--version-policies`); in `explicit` mode only the default model and the
    models the repository API loaded. `reconcile()` moves the loaded set toward it; `poll` mode
    calls it every `--poll-interval-s`. A version that fails to load leaves the serving ones alone
    and reports UNAVAILABLE with the reason."""

    RETIRE_GRACE_S = 1.0  # a front that picked the old version a moment ago still gets it served

    def __init__(self, settings: Settings, core: EngineCore | None = None):
        self.settings = settings
        self.core = core  # the engine process's engine core: every version batches there
        self.loaded: dict[VersionKey, LocalModel] = {}
        self.retiring: dict[VersionKey, LocalModel] = {}
        self.states: dict[VersionKey, VersionState] = {}
        self._failed_this_pass: set[VersionKey] = set()  # versions whose load failed in this reconcile
        self.requested: set[str] = set()  # explicit mode: models the repository API loaded
        self.default_name: str | None = None
        self._lock = asyncio.Lock()
        self._listeners: list = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def models(self) -> list[LocalModel]:
        return [self.loaded[k] for k in sorted(self.loaded)]

    def on_change(self, listener) -> None:
        self._listeners.append(listener)

    def lookup(self, name: str, version: int) -> LocalModel | None:
        return self.loaded.get((name, version)) or self.retiring.get((name, version))

    def stalled(self) -> str | None:
        """Why the engine is stuck (a batch running past `--watchdog-s`), or None."""
        limit = self.settings.watchdog_s
        if limit <= 0:
            return None
        for model in [*self.loaded.values(), *self.retiring.values()]:
            running = model.batcher.longest_running_s()
            if running > limit:
                return (
                    f"engine stalled: a batch of {model.name} v{model.version} has run {running:.0f}s "
                    f"(watchdog {limit:g}s)"
                )
        return None

    async def watch(self, report, period_s: float = 1.0) -> None:
        """The watchdog: every `period_s`, hand `report` the stall reason when it changes (None: fine
        again). A hung engine call cannot be cancelled from Python; what helps is a restart, so
        the service says it is not live and the orchestrator does the rest."""
        current = None
        while True:
            reason = self.stalled()
            if reason != current:
                current = reason
                metrics.ENGINE_STALLED.set(1 if reason else 0)
                if reason:
                    log.error("watchdog: %s; reporting not live", reason)
                else:
                    log.warning("watchdog: the engine is running batches again")
                report(reason)
            await asyncio.sleep(period_s)

    def policy_for(self, name: str) -> str:
        """`--version-policies` for this model, else its `config.json`, else `--version-policy`. The
        model's `config.json` is checked either way: planning is where a wrong one stops the start."""
        configured = self.settings.for_model(name)
        return self.settings.version_policies.get(name) or configured.version_policy

    def plan(self, strict: bool = True) -> tuple[str, list[VersionKey]]:
        """The default model and every (model, version) wanted now, checked against the store before
        anything loads: a wrong name fails in one line, not after minutes of warm-up.

        `strict=False` (a running service): only the default model's problems raise; any other model
        that cannot be planned keeps what of it is loaded (logged), and one whose every version failed
        to load is simply not wanted (the index says why), so one broken model never blocks the rest."""
        s = self.settings
        root = s.store_root
        default_name = s.model or store.default_model(root)
        if s.model_control_mode == "explicit":
            names = list(dict.fromkeys([default_name, *s.models, *sorted(self.requested)]))
        else:
            names = list(dict.fromkeys([default_name, *(s.models or store.list_models(root))]))
        wanted: list[VersionKey] = []
        for name in names:
            try:
                wanted += [(name, v) for v in self._pick(name, default_name)]
            except (QuickNetError, ValueError, OSError) as e:
                if strict or name == default_name:
                    raise
                log.warning("model store: %s", e)
                wanted += [k for k in self.loaded if k[0] == name]
        return default_name, wanted

    def _pick(self, name: str, default_name: str) -> list[int]:
        s = self.settings
        root = s.store_root
        store.check_name(name)
        versions = store.list_versions(root, name)
        if not versions:
            store.get_version(root, name)  # raises the one-line "not found" error
        # a version that failed to load is not a candidate: the policy falls back to older ones
        usable = [v for v in versions if not self._failed_as_it_is((name, v))]
        picked = pick_versions(usable, self.policy_for(name))
        if name == default_name and s.version is not None:
            if s.version not in versions:
                store.get_version(root, default_name, s.version)  # raises "no version N (have: ...)"
            picked = sorted({*picked, s.version})
        if not picked and len(usable) == len(versions):
            have = ", ".join(f"v{v}" for v in usable)
            raise StoreError(f"version policy {self.policy_for(name)!r} picks no version of {name!r} (it has {have})")
        return picked  # empty: every candidate failed to load (UNAVAILABLE, with the reason, in the index)

    async def load(self) -> list[LocalModel]:
        """Start-up: load everything wanted; any failure is fatal (the service never starts broken)."""
        default_name, wanted = self.plan()
        for key in wanted:
            self.loaded[key] = await self._load_version(store.get_version(self.settings.store_root, *key))
            self._set_state(key, "READY")
        self.default_name = default_name
        return self.models

    async def reconcile(self) -> bool:
        """Move the loaded set toward what the store and the policies want now; True if it changed.
        Failures are reported in the index and the log; what serves keeps serving."""
        async with self._lock:
            self._failed_this_pass.clear()
            try:
                default_name, wanted = self.plan(strict=False)
            except (QuickNetError, ValueError, OSError) as e:
                log.error("model store: %s", e)
                return False
            changed = False
            for key in wanted:
                if key in self.loaded:
                    continue
                changed |= await self._try_load(key)
            if changed:  # what just failed drops out of the plan; the versions it would replace stay
                try:
                    default_name, wanted = self.plan(strict=False)
                except (QuickNetError, ValueError, OSError) as e:  # the store changed meanwhile: retire nothing
                    log.error("model store: %s", e)
                    wanted = list(self.loaded)
            for key in [k for k in self.loaded if k not in wanted]:
                self._retire(key)
                changed = True
            if default_name != self.default_name and any(k[0] == default_name for k in self.loaded):
                log.info("default model is now %s", default_name)
                self.default_name, changed = default_name, True
            if changed:
                self._notify()
            return changed

    def _failed_as_it_is(self, key: VersionKey) -> bool:
        """A version whose load failed, its folder unchanged since: not tried again (a published
        version never changes; a repository load retries it). A copy that was still arriving when a
        poll found it (`kubectl cp` of a version folder) is tried again once its files change."""
        st = self.states.get(key)
        if st is None or st.state != "UNAVAILABLE":
            return False
        if key in self._failed_this_pass:  # the plan after a failure must not count on it: what it
            return True  # would replace keeps serving until a later pass loads it
        return st.stamp == store.version_stamp(self.settings.store_root, *key)

    async def _try_load(self, key: VersionKey) -> bool:
        if self._failed_as_it_is(key):
            return False
        # the folder as this load finds it: a copy that completes while the load fails then differs
        stamp = store.version_stamp(self.settings.store_root, *key)
        self._set_state(key, "LOADING")
        self._notify()
        try:
            model = await self._load_version(store.get_version(self.settings.store_root, *key))
        except Exception as e:  # any failure: the reason goes to the index and the log, nothing else moves
            reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
            log.error("cannot load %s v%d: %s", key[0], key[1], reason)
            self._failed_this_pass.add(key)
            self._set_state(key, "UNAVAILABLE", self.client_reason(reason), stamp)
            metrics.MODEL_LOADS.labels(key[0], "failed").inc()
            return True
        self.loaded[key] = model
        self._set_state(key, "READY")
        metrics.MODEL_LOADS.labels(key[0], "loaded").inc()
        return True

    async def _load_version(self, version: store.ModelVersion) -> LocalModel:
        store.verify_files(version)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        engine = await loop.run_in_executor(None, choose, version, self.settings)  # may import torch: off the loop
        settings = self.settings.for_model(version.name, engine)  # its config.json: batch policy, precision, ...
        backend = await loop.run_in_executor(None, load_backend, version, settings)
        await loop.run_in_executor(None, _check_labels, version, backend)
        if self.settings.warmup:
            await loop.run_in_executor(None, backend.warmup)
        if self.settings.fault_injection:
            from quicknet.serve.faults import FaultPlan, FaultyBackend

            spec = self.settings.fault_injection
            backend = FaultyBackend(backend, FaultPlan.parse(spec), spec)
            log.warning("fault injection on %s v%d: %s", version.name, version.version, spec)
        model = LocalModel(version, backend, settings, self.core)
        model.batcher.start()
        files = version.metadata.get("files", {})
        served_file = model.info.description.get("file") or model.info.description.get("plan") or ""
        model._info_labels = (
            version.name,
            str(version.version),
            backend.name,
            files.get(served_file, {}).get("sha256", ""),
        )
        metrics.MODEL_INFO.labels(*model._info_labels).set(1)
        log.info(
            "loaded %s v%d on %s, warmed up in %.2fs",
            version.name,
            version.version,
            model.info.description,
            time.perf_counter() - t0,
        )
        return model

    def _retire(self, key: VersionKey) -> None:
        model = self.loaded.pop(key)
        self.retiring[key] = model
        self._set_state(key, "UNLOADING")
        task = asyncio.create_task(self._close_after_grace(key, model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_after_grace(self, key: VersionKey, model: LocalModel) -> None:
        await asyncio.sleep(self.RETIRE_GRACE_S)
        finished = await model.batcher.drain(self.settings.drain_seconds)
        await model.close()
        self.retiring.pop(key, None)
        self.states.pop(key, None)
        for state in metrics.MODEL_STATES:
            metrics.MODEL_STATE.labels(key[0], str(key[1]), state).set(0)
        metrics.MODEL_UNLOADS.labels(key[0]).inc()
        log.info("unloaded %s v%d%s", key[0], key[1], "" if finished else " (drain period ended: rest answered 503)")
        self._notify()

    def _set_state(self, key: VersionKey, state: str, reason: str = "", stamp: tuple = ()) -> None:
        self.states[key] = VersionState(state, reason, stamp)
        for known in metrics.MODEL_STATES:
            metrics.MODEL_STATE.labels(key[0], str(key[1]), known).set(1 if known == state else 0)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # --- the repository API (explicit mode loads and unloads; every mode has the index) -----------
    # What these answer reaches clients: one line, no server paths, no list of the store's models,
    # at most `store.ECHO_CHARS` of a name the client sent; anything unexpected is a RepositoryError.

    def client_reason(self, reason: str) -> str:
        """`reason` without server paths: the store's root is dropped (store-relative paths stay),
        any other absolute path keeps only its last part; at most 300 characters."""
        for root in {str(self.settings.store_root), str(self.settings.store_root.resolve())}:
            reason = reason.replace(root.rstrip("/") + "/", "")
        reason = _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(1), reason)
        return reason if len(reason) <= 300 else reason[:297] + "..."

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every model version in the store, with its state here (Triton's repository index)."""
        root = self.settings.store_root
        out = []
        try:
            for name in store.list_models(root):
                for version in store.list_versions(root, name):
                    st = self.states.get((name, version), VersionState("UNAVAILABLE", "not loaded"))
                    if ready_only and st.state != "READY":
                        continue
                    reason = self.client_reason(st.reason)
                    out.append({"name": name, "version": str(version), "state": st.state, "reason": reason})
        except (OSError, ValueError) as e:
            log.error("repository index: cannot read the model store: %r", e)
            raise RepositoryError("cannot read the model store now; see the server log") from None
        return out

    def _explicit_only(self) -> None:
        if self.settings.model_control_mode != "explicit":
            raise RepositoryError(
                f"explicit model load / unload is not allowed in model control mode "
                f"{self.settings.model_control_mode!r}; start with --model-control-mode explicit"
            )

    @staticmethod
    def _model_name(name: object) -> str:
        try:
            return store.check_name(name)
        except store.InvalidName as e:
            raise RepositoryError(str(e)) from None

    async def load_model(self, name: str) -> None:
        """Load `name` (explicit mode); a failure answers its reason and leaves the name unrequested."""
        self._explicit_only()
        name = self._model_name(name)
        if not store.list_versions(self.settings.store_root, name):
            raise ModelNotFound(f"model {store.shown(name)} is not found in the model store")
        self.requested.add(name)
        for key in [k for k, st in self.states.items() if k[0] == name and st.state == "UNAVAILABLE"]:
            del self.states[key]  # a repository load is a retry
        try:
            await self.reconcile()
        except Exception as e:  # a bug; the name must not stay requested, the client gets one line
            log.exception("repository load of %s failed", name)
            if not any(k[0] == name for k in self.loaded):
                self.requested.discard(name)
            raise RepositoryError(f"failed to load {store.shown(name)}; see the server log") from e
        failed = []  # what failed in this load (the states of earlier failures were cleared above)
        for n, v in sorted(self.states):
            if n == name and self.states[(n, v)].state == "UNAVAILABLE":
                reason = self.states[(n, v)].reason  # the store's reasons name the version already
                failed.append(reason if reason.startswith(f"{n} v{v}") else f"v{v}: {reason}")
        serving = sorted(v for n, v in self.loaded if n == name)
        if not serving:
            self.requested.discard(name)  # nothing of it serves: the next plan does not retry it
            raise RepositoryError(f"failed to load {store.shown(name)}: {'; '.join(failed) or 'no version loaded'}")
        if failed:  # a version the policy asks for did not load: the load failed, what did load serves
            also = ", ".join(f"v{v}" for v in serving)
            raise RepositoryError(f"failed to load {store.shown(name)}: {'; '.join(failed)} ({also} serving)")

    async def unload_model(self, name: str) -> None:
        self._explicit_only()
        name = self._model_name(name)
        if name == self.default_name:
            raise RepositoryError(f"{name!r} is the default model (/classify answers with it): it stays loaded")
        if name not in self.requested and not any(k[0] == name for k in self.loaded):
            raise ModelNotFound(f"model {name!r} is not loaded")
        self.requested.discard(name)
        try:
            await self.reconcile()
        except Exception as e:
            log.exception("repository unload of %s failed", name)
            raise RepositoryError(f"failed to unload {name!r}; see the server log") from e
        if any(k[0] == name for k in self.loaded):  # the plan could not be made: it still serves
            raise RepositoryError(f"{name!r} is still loaded: the model store cannot be read now; see the server log")

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            await self.reconcile()

    async def drain(self, timeout_s: float) -> bool:
        models = [*self.loaded.values(), *self.retiring.values()]
        results = await asyncio.gather(*(m.batcher.drain(timeout_s) for m in models))
        return all(results)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for m in [*self.loaded.values(), *self.retiring.values()]:
            await m.close()


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^\s/'\"]+/)+([^\s/'\"]+)")


def _check_labels(version: store.ModelVersion, backend: Backend) -> None:
    """The metadata's labels name every class the engine outputs: a mismatch fails the load in one
    line, not every classification later with a 500."""
    logits = np.asarray(backend.infer(np.zeros((1, 32, 32, 3), np.uint8)))
    classes = logits.shape[-1] if logits.ndim == 2 and logits.shape[0] == 1 else None
    if classes != len(version.labels):
        outputs = f"{classes} classes" if classes is not None else f"shape {list(logits.shape)} for one image"
        raise StoreError(
            f"{version.name} v{version.version}: metadata.json has {len(version.labels)} label(s) but the model "
            f"outputs {outputs}; republish this version"
        )
