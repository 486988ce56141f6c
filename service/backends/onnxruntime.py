"""ONNX Runtime: CPU (threads set explicitly), or the CUDA provider where onnxruntime-gpu is installed."""

from __future__ import annotations

import numpy as np

from quicknet.store import ModelVersion
from service.backends import BackendError, warmup_sizes
from service.config import Settings


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, session, path: str, settings: Settings, provider: str):
        self.session = session
        self.path = path
        self.provider = provider
        self.threads = settings.threads
        self.max_batch_size = settings.max_batch_size
        self.input_name = session.get_inputs()[0].name

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> OnnxRuntimeBackend:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install -e '.[serve]'") from None
        artifacts = version.metadata.get("artifacts", {})
        key = (
            "onnx-int8"
            if settings.precision == "int8"
            else ("onnx-optimized" if artifacts.get("onnx-optimized") else "onnx")
        )
        fname = artifacts.get(key)
        if not fname or not version.file(fname).is_file():
            raise BackendError(
                f"{version.name} v{version.version} has no {key} model; republish it or pick another precision"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-wait between batches
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and settings.precision == "fp32":
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = ort.InferenceSession(str(version.file(fname)), opts, providers=providers)
        except Exception as e:  # ORT raises its own exception family for bad or unsupported models
            raise BackendError(f"ONNX Runtime could not load {fname}: {e}") from None
        return cls(session, str(version.file(fname)), settings, session.get_providers()[0])

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.uint8)})[0]

    def warmup(self) -> None:
        for n in warmup_sizes(self.max_batch_size):
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))

    def describe(self) -> dict:
        return {"backend": self.name, "provider": self.provider, "file": self.path, "threads": self.threads}
