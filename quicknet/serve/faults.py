"""Fault injection for tests and drills: wraps an engine so that some of its batches fail or hang.

`--fault-injection 'fail-every=3'` makes every third batch raise; `'hang-every=5,hang-seconds=30'`
makes every fifth batch sleep 30 s first. Counting starts after warm-up. It exists so that what
the service does when its engine misbehaves (one batch fails, the next is served; a hung engine
is reported) can be shown on the real server, in CI and in the reliability report. Off by default.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FaultPlan:
    fail_every: int = 0
    hang_every: int = 0
    hang_seconds: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """'fail-every=N,hang-every=N,hang-seconds=S' (any subset); ValueError with one line if malformed."""
        kinds = {"fail-every": int, "hang-every": int, "hang-seconds": float}
        fields = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in kinds:
                raise ValueError(f"fault injection takes {', '.join(k + '=' for k in kinds)}; got {part!r}")
            try:
                fields[key.replace("-", "_")] = kinds[key](value)
            except ValueError:
                raise ValueError(f"fault injection {key} needs a number, got {value!r}") from None
        return cls(**fields)


class FaultyBackend:
    def __init__(self, inner, plan: FaultPlan, spec: str):
        self.inner = inner
        self.plan = plan
        self.spec = spec
        self.name = inner.name
        self.max_batch_size = inner.max_batch_size
        self._lock = threading.Lock()
        self._calls = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with self._lock:
            self._calls += 1
            n = self._calls
        if self.plan.hang_every and n % self.plan.hang_every == 0:
            time.sleep(self.plan.hang_seconds)
        if self.plan.fail_every and n % self.plan.fail_every == 0:
            raise RuntimeError(f"injected fault on batch {n}")
        return self.inner.infer(batch)

    def warmup(self) -> None:
        self.inner.warmup()

    def describe(self) -> dict:
        return {**self.inner.describe(), "fault_injection": self.spec}
