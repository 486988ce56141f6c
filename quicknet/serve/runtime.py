"""What every front shares: the served model versions (as handles), readiness and draining.

`serving()` is every front's one gate; a front then calls the handle's `classify()` or
`submit()`, the one seam between protocols and inference, so limits, deadlines, metrics and
errors behave the same everywhere. Where the engines run is not this module's business: a
`ModelSource` (in this process, or the engine process) installs the handles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from quicknet import store
from quicknet.serve import metrics
from quicknet.serve.auth import RepositoryGuard
from quicknet.serve.config import Settings
from quicknet.serve.errors import InputError, ModelNotFound, NotAccepting
from quicknet.serve.images import Limits
from quicknet.serve.model import ModelHandle, Prediction, softmax, top_k

__all__ = [
    "ModelHandle",
    "ModelSource",
    "Prediction",
    "Repository",
    "Runtime",
    "check_model_name",
    "softmax",
    "top_k",
]


def check_model_name(name: object) -> str:
    """`name` if it names one folder of the model store, else InputError (400 / INVALID_ARGUMENT)
    in one line: every front checks a client's model name with this before anything else, so a
    path (`../x`, `/tmp/x`, `./m`, `m/`) or a 300-character name never reaches the file system."""
    try:
        return store.check_name(name)
    except store.InvalidName as e:
        raise InputError(str(e), reason="bad_model_name") from None


class Repository(Protocol):
    """The model repository as the KServe/Triton repository extension sees it."""

    async def index(self, ready_only: bool) -> list[dict]: ...

    async def load(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...


class ModelSource(Protocol):
    """Where the engines live. `run()` installs handles into the runtime (and keeps them current);
    `drain()` finishes accepted work; `close()` releases everything."""

    async def run(self) -> None: ...

    async def drain(self, timeout_s: float) -> bool: ...

    async def close(self) -> None: ...


class Runtime:
    """Process-wide state of a front: settings, every served model version, readiness, draining."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = Limits(settings.max_image_bytes, settings.max_image_pixels, settings.max_images_per_request)
        self.models: dict[str, dict[int, ModelHandle]] = {}
        self.default: ModelHandle | None = None
        self.ready = False
        self.draining = False
        self.repository: Repository | None = None  # set by the model source
        self.repository_guard = RepositoryGuard(settings.api_keys_file, settings.admin_api_keys_file)
        self.stalled: str | None = None  # the engine watchdog's reason: neither live nor ready while set
        self._ready_listeners: list[Callable[[bool], None]] = []
        self._told_ready = False  # what the listeners last heard

    def install(self, handles: list[ModelHandle], default_name: str, ready: bool = True) -> None:
        """Serve exactly these versions; `/classify` answers with `default_name` (at `--version`)."""
        models: dict[str, dict[int, ModelHandle]] = {}
        for handle in handles:
            models.setdefault(handle.name, {})[handle.version] = handle
        self.models = models
        self.default = self.get(default_name, self.settings.version) if models else None
        self.set_ready(ready)

    def serving(self, name: str | None = None, version: str | int | None = None) -> ModelHandle:
        """The model version to run a request on, if the service is taking work and its queue has
        room: every front's one gate. No name: the default model (what `/classify` and the
        Classifier gRPC service answer with). A name that is not a model name is 400 first."""
        if name is not None:
            check_model_name(name)
        if self.draining:
            raise NotAccepting("server is shutting down; retry on another replica", "draining")
        if not self.ready or self.default is None:
            raise NotAccepting("model is not ready yet (loading or warming up); retry shortly", "not_ready")
        model = self.default if name is None else self.get(name, version)
        metrics.SERVED.set((model.name, str(model.version)))
        model.admit()
        return model

    @property
    def live(self) -> bool:
        return self.stalled is None

    @property
    def accepting(self) -> bool:
        """Readiness: warmed up, not draining, and no batch stalled past the watchdog (requests sent
        to a stalled engine would only wait out their deadlines: the orchestrator routes them to
        other replicas until the batch returns or liveness has the process restarted)."""
        return self.ready and not self.draining and self.stalled is None

    def get(self, name: str, version: str | int | None = None) -> ModelHandle:
        versions = self.models.get(check_model_name(name))
        if not versions:
            raise ModelNotFound(f"model {name!r} is not served (serving: {', '.join(sorted(self.models)) or 'none'})")
        if version in (None, ""):
            return versions[max(versions)]
        try:
            number = int(version)  # type: ignore[arg-type]
        except ValueError:
            raise ModelNotFound(f"model {name!r} has no version {store.shown(version)}") from None
        if number not in versions:
            have = ", ".join(map(str, sorted(versions)))
            raise ModelNotFound(f"model {name!r} has no version {number} (have: {have})")
        return versions[number]

    def all_models(self) -> list[ModelHandle]:
        return [m for versions in self.models.values() for _, m in sorted(versions.items())]

    def select(self, name: str | None = None, version: str | int | None = None) -> list[ModelHandle]:
        """Every served version; of one model; or one version (statistics scopes). Unknown: ModelNotFound."""
        if not name:
            return self.all_models()
        if version in (None, ""):
            self.get(name)
            return [m for _, m in sorted(self.models[name].items())]
        return [self.get(name, version)]

    def on_ready_change(self, listener: Callable[[bool], None]) -> None:
        self._ready_listeners.append(listener)

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self._tell_readiness()

    def set_stalled(self, reason: str | None) -> None:
        """The engine watchdog's reason (None: no batch is stalled): liveness and readiness follow."""
        self.stalled = reason
        self._tell_readiness()

    def start_draining(self) -> None:
        self.draining = True
        self.set_ready(False)

    def _tell_readiness(self) -> None:
        """`accepting` to the ready gauge, and to the listeners when it changed."""
        ready = self.accepting
        metrics.READY.set(1 if ready else 0)
        if ready != self._told_ready:
            self._told_ready = ready
            for listener in self._ready_listeners:
                listener(ready)

    def deadline_from_timeout_ms(self, timeout_ms: float | None) -> float:
        ms = self.settings.default_timeout_ms if timeout_ms is None else timeout_ms
        return time.monotonic() + ms / 1000
