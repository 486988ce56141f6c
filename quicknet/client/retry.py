"""How long to wait before trying again: the server's Retry-After when it gives one, else
exponential backoff; both jittered so that clients refused together do not return together."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Retry:
    """`attempts` counts every try, the first included (1: never retry). Only refusals that say
    "later" are retried: 429 / RESOURCE_EXHAUSTED, 503 / UNAVAILABLE, a connection that failed. A
    call's deadline bounds the waiting too: a pause that would end past it is not taken."""

    attempts: int = 4
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("Retry.attempts counts the first try too: at least 1")

    def delay(self, attempt: int, retry_after: float | None, rng: Callable[[], float] = random.random) -> float:
        """The pause after failed try number `attempt` (1-based). The server's hint is a floor (plus
        up to 10%); without one, half the exponential step plus a random half ("equal jitter")."""
        step = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        pause = step / 2 + rng() * step / 2
        if retry_after is not None:
            pause = max(pause, retry_after * (1 + 0.1 * rng()))
        return pause
