"""An engine derived from a published file serves only once its logits match that file's.

The torch engine rebuilds its model from `model.onnx` (`folded_onnx`); ONNX Runtime serves a
rewritten `model.onnx` (`ort_graph`). Both are checked here, the same way: seeded random images
through ONNX Runtime on the source file with basic graph optimizations only (plain ONNX semantics,
none of the layout rewrites the derived engine may share; ~0.1 s for the full quicknet), against
the derived engine's logits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quicknet.serve.backends.base import BackendError

CHECK_IMAGES = 16
MAX_LOGIT_DELTA = 1e-3  # relative to the largest logit where that is above 1


def probe_images(count: int = CHECK_IMAGES) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def source_logits(path: Path, images: np.ndarray, threads: int = 1) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def check_logits(got: np.ndarray, expected: np.ndarray, what: str) -> float:
    """The largest logit difference, or `BackendError` (one line) past the tolerance or where the
    top-1 class differs."""
    delta = float(np.abs(got - expected).max())
    if not delta <= MAX_LOGIT_DELTA * max(1.0, float(np.abs(expected).max())):
        raise BackendError(f"{what} disagrees with its source (max |Δlogit| {delta:.2e})")
    if not np.array_equal(got.argmax(1), expected.argmax(1)):
        raise BackendError(f"{what} disagrees with its source (another top-1 class)")
    return delta
