"""TensorRT 10: the plan built for this GPU (see `quicknet compile`). Not exercised by CI.

TensorRT cannot be installed in this project's workplace, so this file is written against the
documented TensorRT 10 Python API and has never run here. It keeps to the basics: one execution
context per in-flight batch (`instances`), input shape set per batch, pinned host buffers, device
buffers sized for the profile's max batch, `execute_async_v3` on each context's own stream.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet.errors import StoreError
from quicknet.serve.backends.base import BackendError, warmup_sizes
from quicknet.serve.config import Settings
from quicknet.store import ModelVersion, gpu_identity, plan_filename, plan_folder

NUM_CLASSES = 10
IMAGE_BYTES = 32 * 32 * 3


def find_plan(version: ModelVersion, settings: Settings) -> Path | None:
    try:
        import tensorrt as trt

        gpu, cc = gpu_identity()
    except (ImportError, StoreError):
        return None
    precision = "int8" if settings.precision == "int8" else "fp16"  # auto: the FP16 plan
    path = plan_folder(settings.plan_dir, version) / plan_filename(gpu, cc, trt.__version__, precision)
    return path if path.is_file() else None


def _check(result):
    from cuda.bindings import runtime as cudart

    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise BackendError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


@dataclass
class _Slot:
    context: object
    stream: int
    host_in: int
    host_out: int
    dev_in: int
    dev_out: int


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, engine, plan: Path, settings: Settings, max_batch: int):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.trt, self.cudart = trt, cudart
        self.engine = engine
        self.plan = plan
        self.max_batch_size = min(settings.max_batch_size, max_batch)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(settings.instances):
            self.slots.put(self._new_slot())

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> TensorRTBackend:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError("TensorRT is not installed: pip install -e '.[gpu]' on an NVIDIA GPU machine") from None
        plan = find_plan(version, settings)
        if plan is None:
            where = f" --plan-dir {settings.plan_dir}" if settings.plan_dir else ""
            raise BackendError(
                f"no TensorRT plan for this GPU in {plan_folder(settings.plan_dir, version)}: run "
                f"`quicknet plan --store-model {version.name} --version {version.version}{where}` on this machine"
            )
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {plan.name} (built by another TensorRT version?)")
        input_name = next(
            engine.get_tensor_name(i)
            for i in range(engine.num_io_tensors)
            if engine.get_tensor_mode(engine.get_tensor_name(i)) == trt.TensorIOMode.INPUT
        )
        max_batch = engine.get_tensor_profile_shape(input_name, 0)[2][0]
        return cls(engine, plan, settings, max_batch)

    def _new_slot(self) -> _Slot:
        cudart = self.cudart
        n_in, n_out = self.max_batch_size * IMAGE_BYTES, self.max_batch_size * NUM_CLASSES * 4
        return _Slot(
            context=self.engine.create_execution_context(),
            stream=_check(cudart.cudaStreamCreate()),
            host_in=_check(cudart.cudaMallocHost(n_in)),
            host_out=_check(cudart.cudaMallocHost(n_out)),
            dev_in=_check(cudart.cudaMalloc(n_in)),
            dev_out=_check(cudart.cudaMalloc(n_out)),
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        n = len(batch)
        slot = self.slots.get()
        try:
            host_in = np.ctypeslib.as_array(
                (np.ctypeslib.ctypes.c_uint8 * (n * IMAGE_BYTES)).from_address(slot.host_in)
            )
            host_in[:] = np.ascontiguousarray(batch, dtype=np.uint8).reshape(-1)
            h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(slot.dev_in, slot.host_in, n * IMAGE_BYTES, h2d, slot.stream))
            if not slot.context.set_input_shape(self.input_name, (n, 32, 32, 3)):
                raise BackendError(f"TensorRT rejected batch size {n}")
            slot.context.set_tensor_address(self.input_name, int(slot.dev_in))
            slot.context.set_tensor_address(self.output_name, int(slot.dev_out))
            if not slot.context.execute_async_v3(int(slot.stream)):
                raise BackendError("TensorRT execution failed")
            out_bytes = n * NUM_CLASSES * 4
            _check(cudart.cudaMemcpyAsync(slot.host_out, slot.dev_out, out_bytes, d2h, slot.stream))
            _check(cudart.cudaStreamSynchronize(slot.stream))
            raw = (np.ctypeslib.ctypes.c_float * (n * NUM_CLASSES)).from_address(slot.host_out)
            return np.ctypeslib.as_array(raw).reshape(n, NUM_CLASSES).copy()
        finally:
            self.slots.put(slot)

    def warmup(self) -> None:
        for n in warmup_sizes(self.max_batch_size):
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))

    def describe(self) -> dict:
        return {"backend": self.name, "plan": str(self.plan), "contexts": self.slots.qsize()}
