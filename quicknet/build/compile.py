"""Compile the exported ONNX model into engines.

ONNX Runtime (CPU, always): a static INT8 model (QDQ, per-channel weights) calibrated on training
images, quantized from `model.onnx` with its PReLUs rewritten as per-channel 1x1 convolutions
(`quicknet/ort_graph.py`: 1.4x faster for one image of the full quicknet, 1.6x at batch 8, at the
same accuracy). No graph-optimized copy is published: ONNX Runtime applies the same optimizations
(and the layout-specific ones a saved copy could not carry) when it loads `model.onnx`, and the
engine rewrites its PReLUs the same way at load.

TensorRT (NVIDIA GPUs): an FP16 plan (INT8 with an entropy calibrator optional) with one
optimization profile, a timing cache, and a file name that says which GPU, compute capability and
TensorRT version built it — plans run only there. `tensorrt` is imported lazily; where it is not
installed this stage raises a one-line BuildError and the build skips it. CI never exercises it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet.build.ortrun import INPUT_NAME
from quicknet.build.progress import steps
from quicknet.errors import BuildError
from quicknet.fsutil import atomic_write
from quicknet.ort_graph import rewrite_file
from quicknet.store import gpu_identity, plan_cache_filenames, plan_filename

ORT_INT8 = "model.int8.onnx"


def quantize_int8(onnx_path: Path, out_path: Path, calibration_images: np.ndarray, batch_size: int = 64) -> Path:
    """Static INT8 (QDQ): activations calibrated on `calibration_images` (uint8 NHWC, training split),
    quantized from the graph with its PReLUs in ORT's fast form (`ort_graph.rewrite_file`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            starts = range(0, len(calibration_images), batch_size)
            batches = (calibration_images[i : i + batch_size] for i in starts)
            self.batches = iter(steps(batches, len(starts), "INT8 calibration"))

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        rewritten = Path(tmp) / "rewritten.onnx"
        prepped = Path(tmp) / "prepped.onnx"
        staged = Path(tmp) / out_path.name
        rewrite_file(onnx_path, rewritten)
        quant_pre_process(str(rewritten), str(prepped))
        quantize_static(
            str(prepped),
            str(staged),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        with atomic_write(out_path) as f:
            f.write(staged.read_bytes())
    return out_path


@dataclass(frozen=True)
class TensorRTOptions:
    fp16: bool = True
    int8: bool = False
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_bytes: int = 1 << 30


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BuildError(
            "TensorRT is not installed: install the `gpu` extra on a machine with an NVIDIA GPU "
            "(pip install -e '.[gpu]'), or skip the TensorRT stage (--no-tensorrt)"
        ) from None
    return tensorrt


def build_tensorrt_plan(
    onnx_path: Path, out_dir: Path, options: TensorRTOptions, calibration_images: np.ndarray | None = None
) -> Path:
    trt = import_tensorrt()
    gpu_name, cc = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors}")

    config = builder.create_builder_config()
    timing_name, calibration_name = plan_cache_filenames(gpu_name, cc, trt.__version__)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    profile = builder.create_optimization_profile()
    shape = (32, 32, 3)
    profile.set_shape(INPUT_NAME, (options.min_batch, *shape), (options.opt_batch, *shape), (options.max_batch, *shape))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError("TensorRT rejected the optimization profile")
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.int8:
        if calibration_images is None:
            raise BuildError("INT8 TensorRT plans need calibration images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        calibration_cache = out_dir / calibration_name
        config.int8_calibrator = _entropy_calibrator(trt, calibration_images, options.opt_batch, calibration_cache)

    cache_path = out_dir / timing_name
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path = out_dir / plan_filename(gpu_name, cc, trt.__version__, "int8" if options.int8 else "fp16")
    with atomic_write(plan_path) as f:
        f.write(bytes(serialized))
    with atomic_write(cache_path) as f:
        f.write(bytes(config.get_timing_cache().serialize()))
    return plan_path


def _entropy_calibrator(trt, images: np.ndarray, batch_size: int, cache_path: Path):
    from cuda.bindings import runtime as cudart

    def check(result):
        err, *rest = result
        if err != cudart.cudaError_t.cudaSuccess:
            raise BuildError(f"CUDA call failed during INT8 calibration: {err}")
        return rest[0] if rest else None

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = [
                np.ascontiguousarray(images[i : i + batch_size])
                for i in range(0, len(images) - batch_size + 1, batch_size)
            ]
            self.device_buffer = check(cudart.cudaMalloc(batch_size * 32 * 32 * 3))
            self.cache_path = cache_path

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names):
            if not self.batches:
                return None
            batch = self.batches.pop(0)
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check(cudart.cudaMemcpy(self.device_buffer, batch.ctypes.data, batch.nbytes, kind))
            return [int(self.device_buffer)]

        def read_calibration_cache(self):
            return self.cache_path.read_bytes() if self.cache_path.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            with atomic_write(self.cache_path) as f:
                f.write(bytes(cache))

    return EntropyCalibrator()
