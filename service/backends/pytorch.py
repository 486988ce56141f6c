"""PyTorch: the folded model (`model.pt2`, a torch.export program). The GPU path we can run.

On CUDA: fp16 autocast, channels_last (a uint8 NHWC input permuted to NCHW already has that
layout), and one CUDA graph captured per batch bucket (powers of two up to the max); a batch is
padded to its bucket, so every shape the engine sees was captured at warm-up. On CPU: fp32.
"""

from __future__ import annotations

import threading

import numpy as np

from quicknet.store import ModelVersion
from service.backends import BackendError, warmup_sizes
from service.config import Settings


class TorchBackend:
    name = "torch"

    def __init__(self, module, device: str, settings: Settings, path: str):
        import torch

        self.torch = torch
        self.module = module
        self.device = device
        self.path = path
        self.max_batch_size = settings.max_batch_size
        self.buckets = warmup_sizes(settings.max_batch_size)
        self.graphs: dict[int, tuple] = {}
        self.lock = threading.Lock()  # CUDA graphs share static buffers: one batch at a time per bucket set

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> TorchBackend:
        try:
            import torch
        except ImportError:
            raise BackendError("torch is not installed: the torch backend needs the build or gpu extra") from None
        fname = version.metadata.get("artifacts", {}).get("torch")
        if not fname or not version.file(fname).is_file():
            raise BackendError(f"{version.name} v{version.version} has no torch artifact (model.pt2); republish it")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(settings.threads)
        module = torch.export.load(str(version.file(fname))).module().to(device)
        if device == "cuda":
            module = module.to(memory_format=torch.channels_last)
        return cls(module, device, settings, str(version.file(fname)))

    def _run(self, x):
        torch = self.torch
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.device == "cuda"):
            return self.module(x).float()

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _capture(self, size: int) -> tuple:
        torch = self.torch
        static_in = torch.zeros((size, 32, 32, 3), dtype=torch.uint8, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm kernels and the allocator before capture
                self._run(static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._run(static_in)
        return graph, static_in, static_out

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))
        if self.device == "cpu":
            return self._run(x).numpy()
        n = len(batch)
        size = self._bucket(n)
        with self.lock:
            if size not in self.graphs:
                self.graphs[size] = self._capture(size)
            graph, static_in, static_out = self.graphs[size]
            static_in[:n].copy_(x.pin_memory(), non_blocking=True)
            graph.replay()
            return static_out[:n].cpu().numpy()

    def warmup(self) -> None:
        for n in self.buckets:
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))

    def describe(self) -> dict:
        name = self.torch.cuda.get_device_name() if self.device == "cuda" else "cpu"
        return {"backend": self.name, "device": name, "file": self.path, "cuda_graphs": self.device == "cuda"}
