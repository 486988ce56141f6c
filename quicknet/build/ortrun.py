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
    # 500-image batches: waking threads costs nothing next to an op; spinning between ops would take
    # the CPU from anything else running (a server beside an evaluation, the second test worker)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    starts = range(0, len(images), batch_size)
    return np.concatenate(
        [sess.run(None, {INPUT_NAME: images[i : i + batch_size]})[0] for i in steps(starts, len(starts), path.name)]
    )
