"""Run an ONNX model with ONNX Runtime on the CPU, batch by batch (no torch needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quicknet.build.progress import steps

INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def onnx_logits(path: Path, images: np.ndarray, batch_size: int = 500, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    starts = range(0, len(images), batch_size)
    return np.concatenate(
        [sess.run(None, {INPUT_NAME: images[i : i + batch_size]})[0] for i in steps(starts, len(starts), path.name)]
    )
