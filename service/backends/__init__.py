"""Engines behind one small face. Each backend imports its engine library lazily, inside itself.

    load(version, settings) -> Backend     (classmethod)
    infer(batch: uint8 [N,32,32,3]) -> float32 logits [N,10]
    max_batch_size, warmup(), describe()

`choose()` picks automatically: a TensorRT plan built for this GPU → tensorrt; else CUDA with
torch → torch; else onnxruntime. A forced `--backend` that cannot load fails with one line.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np

from quicknet.store import ModelVersion
from service.config import Settings


class BackendError(Exception):
    """The engine cannot load or run: a one-line reason and what to do."""


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


def _cuda_with_torch() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def choose(version: ModelVersion, settings: Settings) -> str:
    if settings.backend != "auto":
        return settings.backend
    if importlib.util.find_spec("tensorrt") is not None:
        from service.backends.tensorrt import find_plan

        if find_plan(version, settings) is not None:
            return "tensorrt"
    if _cuda_with_torch() and version.metadata.get("artifacts", {}).get("torch"):
        return "torch"
    return "onnxruntime"


def load_backend(version: ModelVersion, settings: Settings) -> Backend:
    name = choose(version, settings)
    if name == "onnxruntime":
        from service.backends.onnxruntime import OnnxRuntimeBackend as cls
    elif name == "torch":
        from service.backends.pytorch import TorchBackend as cls
    elif name == "tensorrt":
        from service.backends.tensorrt import TensorRTBackend as cls
    else:
        raise BackendError(f"unknown backend {name!r}; choose auto, onnxruntime, torch or tensorrt")
    return cls.load(version, settings)
