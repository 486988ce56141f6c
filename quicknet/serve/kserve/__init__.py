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
from collections.abc import Sequence

import numpy as np

from quicknet.serve.errors import InputError, clip
from quicknet.serve.images import PIXELS_PER_IMAGE, Limits, check_count, decode_images
from quicknet.serve.model import ModelHandle, softmax
from quicknet.serve.runtime import Runtime

INPUT = "images"
OUTPUT = "logits"
SERVER_NAME = "quicknet-serving"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "classification", "statistics", "model_configuration", "model_repository"]
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch_torchexport"}
NUM_CLASSES = 10


def model_metadata(model: ModelHandle, runtime: Runtime) -> dict:
    info = model.info
    return {
        "name": info.name,
        "versions": [str(v) for v in sorted(runtime.models[info.name])],
        "platform": PLATFORMS.get(info.backend, info.backend),
        "inputs": [{"name": INPUT, "datatype": "UINT8", "shape": [-1, 32, 32, 3]}],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, NUM_CLASSES]}],
    }


def model_config(model: ModelHandle) -> dict:
    """Triton's model configuration (JSON form), as perf_analyzer and tritonclient read it."""
    info = model.info
    return {
        "name": info.name,
        "platform": PLATFORMS.get(info.backend, info.backend),
        "backend": info.backend,
        "max_batch_size": info.max_batch_size,
        "input": [{"name": INPUT, "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC", "dims": [32, 32, 3]}],
        "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES], "label_filename": ""}],
        "dynamic_batching": {
            "preferred_batch_size": list(info.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(info.max_queue_delay_s * 1e6),
        },
        "instance_group": [{"name": info.name, "count": info.instances, "kind": "KIND_CPU"}],
    }


async def model_statistics(model: ModelHandle) -> dict:
    """Triton's statistics for one version (the engine keeps them; see `quicknet.serve.model.Statistics`)."""
    return {"name": model.name, "version": str(model.version), **(await model.statistics())}


def parse_bytes_tensor(raw: bytes, most: int | None = None) -> list[bytes]:
    """The binary form of a BYTES tensor: each element is a 4-byte little-endian length, then the
    bytes. Past `most` elements it stops: the count no longer matches the shape, whatever follows."""
    out, offset = [], 0
    while offset < len(raw):
        if most is not None and len(out) > most:
            break
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


def _integers(values) -> np.ndarray:
    """JSON or protobuf UINT8 data as one flat integer array; anything else (strings, floats,
    booleans, ragged nesting, numbers past int64) is the client's mistake, said in one line."""
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        array = None
    if array is None or (array.dtype.kind not in "iu" and array.size):
        raise InputError(f"input {INPUT!r} UINT8 data must be a list (flat or nested) of integers 0..255")
    return array.reshape(-1)


MAX_ECHO_DIMS = 5


def shape_text(shape) -> str:
    """A client's shape as an error echoes it: its first dimensions, then how many there are
    (a 1 M-dimension shape echoed whole was a 3.4 MB answer, and overflowed gRPC's status)."""
    dims = ", ".join(str(d) for d in shape[:MAX_ECHO_DIMS])
    more = f", … ({len(shape)} dims)" if len(shape) > MAX_ECHO_DIMS else ""
    return f"[{clip(dims, 80)}{more}]"


def _echo(value: object) -> str:
    return clip(repr(value), 40)


def decode_input(
    name: str,
    datatype: str,
    shape: list[int],
    limits: Limits,
    *,
    raw: bytes | None = None,
    values: Sequence | None = None,
) -> np.ndarray:
    """One KServe input tensor → uint8 NHWC images. `raw` is the binary form, `values` the typed
    one: a JSON list (flat or nested; its size is bounded before it is parsed) or a flat sequence
    (gRPC's repeated field), whose length is checked before any element is copied."""
    if name != INPUT:
        raise InputError(f"unknown input {_echo(name)}: this model takes {INPUT!r}")
    if datatype == "UINT8":
        if len(shape) != 4 or list(shape[1:]) != [32, 32, 3] or shape[0] < 1:
            raise InputError(f"input {INPUT!r} of datatype UINT8 must have shape [N,32,32,3], got {shape_text(shape)}")
        n = int(shape[0])
        check_count(n, limits)
        expected = n * PIXELS_PER_IMAGE
        if raw is not None:
            if len(raw) != expected:
                raise InputError(
                    f"input {INPUT!r} has {len(raw)} bytes; shape {shape_text(shape)} UINT8 needs {expected}"
                )
            return np.frombuffer(raw, dtype=np.uint8).reshape(n, 32, 32, 3)
        if values is not None and not isinstance(values, list):  # flat: counted, then copied at C speed
            if len(values) != expected:
                raise InputError(
                    f"input {INPUT!r} has {len(values)} values; shape {shape_text(shape)} needs {expected}"
                )
            flat = np.fromiter(values, dtype=np.int64, count=expected)
        else:
            flat = _integers(values if values is not None else [])
        if flat.size != expected:
            raise InputError(f"input {INPUT!r} has {flat.size} values; shape {shape_text(shape)} needs {expected}")
        if flat.size and (flat.min() < 0 or flat.max() > 255):
            raise InputError(f"input {INPUT!r} has values outside 0..255 for UINT8")
        return flat.astype(np.uint8).reshape(n, 32, 32, 3)
    if datatype == "BYTES":
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 0:
            raise InputError(f"input {INPUT!r} of datatype BYTES must have shape [N] or [N,1], got {shape_text(shape)}")
        n = int(shape[0])
        check_count(n, limits)  # the declared count, before any element is split out or copied
        if raw is not None:
            blobs = parse_bytes_tensor(raw, most=n)
            held = f"more than {n}" if len(blobs) > n else str(len(blobs))
        else:
            blobs = values if values is not None else []
            held = str(len(blobs))
        if len(blobs) != n:
            raise InputError(f"input {INPUT!r} holds {held} elements; shape {shape_text(shape)} says {n}")
        return decode_images(list(blobs), limits)
    raise InputError(
        f"input {INPUT!r} must be UINT8 [N,32,32,3] or BYTES [N] (encoded images), got {clip(str(datatype), 40)}"
    )


def classification(logits: np.ndarray, k: int, labels: list[str]) -> list[list[bytes]]:
    """The classification extension: per image, the top k as b"score:index:label"."""
    if not 1 <= k <= NUM_CLASSES:
        raise InputError(f"classification must be from 1 to {NUM_CLASSES}, got {k}")
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[f"{p[i]:.6f}:{i}:{labels[i]}".encode() for i in row] for row, p in zip(order, probs, strict=True)]
