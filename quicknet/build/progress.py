"""Progress bars for the build's long loops (evaluation, export's equivalence check, INT8
calibration, JPEG decoding): minutes on a CPU with no output otherwise.

On stderr, only when it is a terminal (logs and CI stay clean), or when QUICKNET_PROGRESS=1 asks
for it anyway (0 turns it off). tqdm is in the build extra; without it, loops run plain.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def wanted() -> bool:
    setting = os.environ.get("QUICKNET_PROGRESS", "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr is not None and sys.stderr.isatty()


def steps(iterable: Iterable[T], total: int, desc: str, unit: str = "batch") -> Iterator[T] | Iterable[T]:
    """`iterable`, counted on a progress bar when one is wanted."""
    if not wanted():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, mininterval=0.5)
