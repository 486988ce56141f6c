"""What every engine is, in one small face (as LitServe's `specs/base.py`): `Backend`, the one
error a backend raises (`BackendError`), and the batch sizes each warms up. Every backend module
imports this, never the package's chooser (`backends/__init__.py`), so nothing here imports back.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from quicknet.errors import QuickNetError


class BackendError(QuickNetError):
    """The engine cannot load or run: a one-line reason and what to do (a `QuickNetError`: where it
    stops a command, the command prints it in one line)."""


class Backend(Protocol):
    name: str
    max_batch_size: int

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self) -> None: ...

    def describe(self) -> dict: ...


def warmup_sizes(max_batch_size: int) -> list[int]:
    """Powers of two up to the max, and the max: the batch buckets an engine will see."""
    sizes, s = [], 1
    while s < max_batch_size:
        sizes.append(s)
        s *= 2
    return [*sizes, max_batch_size]
