"""The messages between front processes and the engine process, typed, in one module (as vLLM's
engine core keeps its request and response types): a dataclass per kind, sent pickled and
length-prefixed over the Unix socket (`ipc.py`).

Requests are not among them: they travel as records in the front's shared memory (`ipc.Ring`,
`engine_core.py`). The socket carries what is rare: the engine's state, an engine failure's
words, statistics and the repository API.

    front -> engine   Hello (once, with the ring's memfd and two eventfds)   Seen   Stats
                      Index   Load   Unload (the repository API)
    engine -> front   State   Stalled   Failed   Error   Result
"""

from __future__ import annotations

from dataclasses import dataclass

from quicknet.serve.model import ModelInfo


@dataclass(slots=True)
class Hello:
    pid: int
    blocks: int  # the ring's size; its memfd, doorbell and bell travel beside this message


@dataclass(slots=True)
class State:
    ready: bool
    models: list[ModelInfo]
    default_model: str | None
    keys: list[int]  # each model version's key, for the records (`ipc.REQUEST["model"]`)
    generation: int  # counts the engine's states; the front says `Seen` once it serves this one


@dataclass(slots=True)
class Seen:
    """A front serves the engine's state `generation` (a repository load or unload is answered
    only once every front does: a model loaded through one front is ready on all)."""

    generation: int


@dataclass(slots=True)
class Stalled:
    reason: str | None  # the engine watchdog's verdict (None: healthy again)


@dataclass(slots=True)
class Failed:
    """The engine failed on a batch: these blocks' requests are answered with its reason."""

    blocks: list[int]
    kind: str
    message: str
    extra: object


@dataclass(slots=True)
class Error:
    """A statistics or repository call refused or failed: `errors.to_wire`'s (kind, message, extra)."""

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
class Index:
    """The repository index (every model version the store holds or serves)."""

    id: int
    ready_only: bool


@dataclass(slots=True)
class Load:
    """Load (or reload) a model's versions, in explicit model-control mode."""

    id: int
    name: str


@dataclass(slots=True)
class Unload:
    """Unload a model's versions, in explicit model-control mode."""

    id: int
    name: str


RepositoryCall = Index | Load | Unload


@dataclass(slots=True)
class Result:
    id: int
    value: object
