"""Engines behind one small face. Each backend imports its engine library lazily, inside itself.

    load(version, settings) -> Backend     (classmethod)
    infer(batch: uint8 [N,32,32,3]) -> float32 logits [N,10]
    max_batch_size, warmup(), describe()

`choose()` picks automatically: a TensorRT plan built for this GPU → tensorrt; else a fused engine
built for this machine → fused (one built for another is refused in one log line); else a GPU and
torch → torch; else onnxruntime. Whether a GPU exists is asked of NVML or the device files, never
of torch: a CPU service must not pay torch's import (hundreds of MB resident) just to learn "no".
A forced `--backend` that cannot load fails with one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING

from quicknet.serve.backends.base import Backend, BackendError, warmup_sizes

if TYPE_CHECKING:
    from quicknet.serve.config import Settings
    from quicknet.store import ModelVersion

__all__ = ["ENGINES", "Backend", "BackendError", "choose", "load_backend", "warmup_sizes"]

log = logging.getLogger("quicknet.backends")


# One table: engine name -> (module, class). Modules import their engine library lazily.
ENGINES: dict[str, tuple[str, str]] = {
    "onnxruntime": ("quicknet.serve.backends.onnxruntime", "OnnxRuntimeBackend"),
    "torch": ("quicknet.serve.backends.pytorch", "TorchBackend"),
    "tensorrt": ("quicknet.serve.backends.tensorrt", "TensorRTBackend"),
    "fused": ("quicknet.serve.backends.fused", "FusedBackend"),
}


def choose(version: ModelVersion, settings: Settings) -> str:
    if settings.backend != "auto":
        return settings.backend
    from quicknet.serve.gpu import gpu_present

    if not gpu_present():
        return "onnxruntime"
    if importlib.util.find_spec("tensorrt") is not None:
        from quicknet.serve.backends.tensorrt import find_plan

        if find_plan(version, settings) is not None:
            return "tensorrt"
    artifacts = version.metadata.get("artifacts", {})
    if artifacts.get("fused-gpu") and all(importlib.util.find_spec(m) for m in ("torch", "triton")):
        from quicknet.serve.backends.fused import batch_too_big, engine_fits

        path, refused = engine_fits(version)
        if path is not None and not (refused := batch_too_big(settings)):
            return "fused"
        log.warning("%s: serving the eager torch engine", refused)
    # the torch engine reads its own file, or derives its model from model.onnx with the onnx package
    # (and checks it with ONNX Runtime): without that package, auto serves with ONNX Runtime instead
    derivable = artifacts.get("onnx") and importlib.util.find_spec("onnx") is not None
    if importlib.util.find_spec("torch") is not None and (artifacts.get("torch") or derivable):
        import torch

        if torch.cuda.is_available():
            return "torch"
    return "onnxruntime"


def load_backend(version: ModelVersion, settings: Settings) -> Backend:
    name = choose(version, settings)
    if name not in ENGINES:
        raise BackendError(f"unknown backend {name!r}; choose auto, {', '.join(ENGINES)}")
    module, cls = ENGINES[name]
    return getattr(importlib.import_module(module), cls).load(version, settings)
