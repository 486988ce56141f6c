"""What every peer server shares: the ONNX Runtime session (the service's engine's settings:
`quicknet.serve.backends.onnxruntime._session`, so a comparison measures the servers),
PNG decoding and the top-5 answer. Standard library, numpy, Pillow and onnxruntime only."""

from __future__ import annotations

import io
import os

import numpy as np

LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "2"))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    opts.add_session_config_entry("session.dynamic_block_base", "4")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def top5(logits: np.ndarray) -> list[dict]:
    z = np.exp(logits - logits.max())
    p = z / z.sum()
    order = np.argsort(-p)[:5]
    return [{"label": LABELS[i], "index": int(i), "score": float(p[i])} for i in order]
