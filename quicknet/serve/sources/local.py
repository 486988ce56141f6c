"""The in-process model source (`--workers 1`)."""

from __future__ import annotations

import asyncio

from quicknet.serve.config import Settings
from quicknet.serve.engine import Engine
from quicknet.serve.runtime import Runtime


class LocalSource:
    """Engines in this process: load and warm every version, hand the runtime their handles, and
    keep them current as versions come and go (poll mode, or the repository API)."""

    def __init__(self, settings: Settings, runtime: Runtime):
        self.engine = Engine(settings)
        self.runtime = runtime
        runtime.repository = self

    async def run(self) -> None:
        await self.engine.load()
        self.engine.on_change(self._install)
        self._install()
        jobs = [self.engine.watch(self._stalled)]
        if self.engine.settings.model_control_mode == "poll":
            jobs.append(self.engine.poll_forever())
        await asyncio.gather(*jobs)

    def _stalled(self, reason: str | None) -> None:
        self.runtime.set_stalled(reason)

    def _install(self) -> None:
        self.runtime.install(self.engine.models, self.engine.default_name)

    async def index(self, ready_only: bool) -> list[dict]:
        return self.engine.index(ready_only)

    async def load(self, name: str) -> None:
        await self.engine.load_model(name)

    async def unload(self, name: str) -> None:
        await self.engine.unload_model(name)

    async def drain(self, timeout_s: float) -> bool:
        return await self.engine.drain(timeout_s)

    async def close(self) -> None:
        await self.engine.close()
