"""The messages between front processes and the engine process, typed, in one module (as vLLM's
engine core keeps its request and response types): a dataclass per kind, sent pickled and
length-prefixed over the Unix socket (`ipc.py`), pixels and logits never among them (they sit
in the front's shared-memory ring).

The hot path works per batch, not per request: a front sends every request it accepted in one
loop iteration for one model as one `Submits` (a record array), and the engine answers every
request a batch finished for one front as one `Dones`. Refusals, statistics and the repository
API are rare and travel one message each.

    front -> engine   Hello (once, with the ring's descriptor)   Submits   Cancels   Stats   Call
    engine -> front   State   Stalled   Dones   Error   Result
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quicknet.serve.model import ModelInfo

# One request: its id (the front's), where its blocks are listed in `Submits.blocks`
# (`first`, `count`), how many images, and its deadline (time.monotonic(), one clock per host).
SUBMIT = np.dtype([("id", "<i8"), ("first", "<i4"), ("count", "<i4"), ("n", "<i4"), ("deadline", "<f8")])
# One finished request and its time in the engine (the front's Timing); logits are in its blocks.
DONE = np.dtype([("id", "<i8"), ("queue_s", "<f4"), ("infer_s", "<f4"), ("input_s", "<f4"), ("output_s", "<f4")])


@dataclass(slots=True)
class Hello:
    pid: int
    blocks: int  # the ring's size; its memfd travels beside this message


@dataclass(slots=True)
class State:
    ready: bool
    models: list[ModelInfo]
    default_model: str | None


@dataclass(slots=True)
class Stalled:
    reason: str | None  # the engine watchdog's verdict (None: healthy again)


@dataclass(slots=True)
class Submits:
    """Requests for one model version and protocol, accepted in one loop iteration of a front."""

    model: str
    version: int
    protocol: str
    records: np.ndarray  # SUBMIT
    blocks: np.ndarray  # int32: every request's ring blocks, back to back


@dataclass(slots=True)
class Cancels:
    ids: list[int]  # their clients went away: drop them if still queued; answer each once either way


@dataclass(slots=True)
class Dones:
    records: np.ndarray  # DONE


@dataclass(slots=True)
class Error:
    """One request refused or failed: `errors.to_wire`'s (kind, message, extra)."""

    id: int
    kind: str
    message: str
    extra: object


@dataclass(slots=True)
class Stats:
    id: int
    model: str
    version: int


@dataclass(slots=True)
class Call:
    """The repository API (index, load, unload), answered by the engine process."""

    id: int
    method: str
    args: tuple


@dataclass(slots=True)
class Result:
    id: int
    value: object
