"""Open Inference Protocol (KServe v2), as Triton speaks it, on REST and gRPC.

What both fronts share lives here: model metadata and config, tensor decoding (UINT8 pixels or
BYTES encoded images), the classification extension, and statistics. Every KServe request goes
through the same decode → limits → batcher path as `/classify`.

Inputs: `images`, either UINT8 [N,32,32,3] (raw pixels, NHWC) or BYTES [N] (encoded images,
decoded by the service; in JSON, base64 strings). Outputs: `logits` FP32 [N,10], or with the
classification extension (`"classification": k`) BYTES [N,k] strings `"score:index:label"`.
"""

from __future__ import annotations

import struct

import numpy as np

from service.images import PIXELS_PER_IMAGE, InputError, Limits, check_count, decode_images
from service.runtime import ModelRuntime, Runtime, softmax

INPUT = "images"
OUTPUT = "logits"
SERVER_NAME = "quicknet-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration"]
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_torchexport"}
NUM_CLASSES = 10


def model_metadata(mr: ModelRuntime, runtime: Runtime) -> dict:
    return {
        "name": mr.name,
        "versions": [str(v) for v in sorted(runtime.models[mr.name])],
        "platform": PLATFORMS.get(mr.backend.name, mr.backend.name),
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
    }


def model_config(mr: ModelRuntime) -> dict:
    """Triton's model configuration (JSON form), as perf_analyzer and tritonclient read it."""
    b = mr.batcher
    return {
        "name": mr.name,
        "platform": PLATFORMS.get(mr.backend.name, mr.backend.name),
        "backend": mr.backend.name,
        "max_batch_size": b.max_batch_size,
        "input": [{"name": INPUT, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3]}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES], "label_filename": ""}],
        "dynamic_batching": {
            "preferred_batch_size": list(b.preferred),
            "max_queue_delay_microseconds": int(b.max_queue_delay_s * 1e6),
        },
        "instance_group": [{"name": mr.name, "count": b.instances, "kind": "KIND_CPU"}],
    }


def model_statistics(mr: ModelRuntime) -> dict:
    s = mr.stats

    def d(x) -> dict:
        return {"count": x.count, "ns": x.ns}

    zero = {"count": 0, "ns": 0}
    return {
        "name": mr.name,
        "version": str(mr.version.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": d(s.success),
            "fail": d(s.fail),
            "queue": d(s.queue),
            "compute_input": zero,
            "compute_infer": d(s.compute_infer),
            "compute_output": zero,
        },
        "batch_stats": [
            {"batch_size": size, "compute_input": zero, "compute_infer": d(dur), "compute_output": zero}
            for size, dur in sorted(s.batches.items())
        ],
    }


def parse_bytes_tensor(raw: bytes) -> list[bytes]:
    """The binary form of a BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    out, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InputError("BYTES tensor is truncated: a length prefix is cut off")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise InputError("BYTES tensor is truncated: an element is shorter than its length prefix")
        out.append(raw[offset : offset + n])
        offset += n
    return out


def serialize_bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def decode_input(
    name: str, datatype: str, shape: list[int], limits: Limits, *, raw: bytes | None = None, values: list | None = None
) -> np.ndarray:
    """One KServe input tensor → uint8 NHWC images. `raw` is the binary form, `values` the typed one."""
    if name != INPUT:
        raise InputError(f"unknown input {name!r}: this model takes {INPUT!r}")
    if datatype == "UINT8":
        if len(shape) != 4 or list(shape[1:]) != [32, 32, 3] or shape[0] < 1:
            raise InputError(f"input {INPUT!r} of datatype UINT8 must have shape [N,32,32,3], got {list(shape)}")
        n = int(shape[0])
        check_count(n, limits)
        expected = n * PIXELS_PER_IMAGE
        if raw is not None:
            if len(raw) != expected:
                raise InputError(f"input {INPUT!r} has {len(raw)} bytes; shape {list(shape)} UINT8 needs {expected}")
            return np.frombuffer(raw, dtype=np.uint8).reshape(n, 32, 32, 3)
        flat = np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1)
        if flat.size != expected:
            raise InputError(f"input {INPUT!r} has {flat.size} values; shape {list(shape)} needs {expected}")
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise InputError(f"input {INPUT!r} has values outside 0..255 for UINT8")
        return flat.astype(np.uint8).reshape(n, 32, 32, 3)
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise InputError(f"input {INPUT!r} of datatype BYTES must have shape [N] or [N,1], got {list(shape)}")
        blobs = parse_bytes_tensor(raw) if raw is not None else list(values or [])
        if len(blobs) != shape[0]:
            raise InputError(f"input {INPUT!r} holds {len(blobs)} elements; shape {list(shape)} says {shape[0]}")
        return decode_images(blobs, limits)
    raise InputError(f"input {INPUT!r} must be UINT8 [N,32,32,3] or BYTES [N] (encoded images), got {datatype}")


def classification(logits: np.ndarray, k: int, labels: list[str]) -> list[list[bytes]]:
    """The classification extension: per image, the top k as b"score:index:label"."""
    if not 1 <= k <= NUM_CLASSES:
        raise InputError(f"classification must be from 1 to {NUM_CLASSES}, got {k}")
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[f"{p[i]:.6f}:{i}:{labels[i]}".encode() for i in row] for row, p in zip(order, probs, strict=True)]
