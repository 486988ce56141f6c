"""PyTorch: the folded model on CUDA (the GPU engine we can run) or on the CPU.

The model is derived at load from the version's hashed `model.onnx` (`folded_onnx`: the layer
list and weights read back from the graph, then checked against ONNX Runtime on the same file
before it serves), so a version stores its FP32 weights once. Versions published before that
name their own torch file: `model.folded.pt` (a layer list and a state dict, `weights_only`) or
`model.pt2` (a `torch.export` program, which only the torch that wrote it is sure to read).

On CUDA: fp16 weights and activations, channels_last (a uint8 NHWC input permuted to NCHW
already has that layout), and `instances` lanes. A lane is one batch in flight: its own CUDA
stream, its own pinned host buffers, and one CUDA graph per batch bucket (powers of two up to
the max) captured at warm-up; a batch is padded to its bucket, so every shape the engine sees
was captured. With several lanes, one batch's copies overlap another's compute, and the GPU
does not idle while the host scatters results. On CPU: fp32, `threads` intra-op threads.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quicknet.serve.backends.base import BackendError, warmup_sizes
from quicknet.serve.backends.folded_onnx import FOLDED_FORMAT
from quicknet.serve.config import Settings
from quicknet.store import ModelVersion


def build_folded(spec: dict):
    """The folded QuickNet from `quicknet.build.export.folded_spec` data: normalize → features → pool → linear."""
    import torch
    from torch import nn

    class Normalize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(3))
            self.register_buffer("shift", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 NHWC -> NCHW in the weights' dtype
            return (x.to(self.scale.dtype) * self.scale + self.shift).permute(0, 3, 1, 2)

    class Folded(nn.Module):
        def __init__(self, features: nn.Sequential, classifier: nn.Linear) -> None:
            super().__init__()
            self.normalize = Normalize()
            self.features = features
            self.classifier = classifier

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(self.normalize(images)).mean(dim=(2, 3)))

    class Residual(nn.Module):  # `x + body(x)`, quicknet-res's shortcut (`body`: fold.FoldedResidual's keys)
        def __init__(self, body: nn.Sequential) -> None:
            super().__init__()
            self.body = body

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.body(x)

    def build(specs: list[dict]) -> nn.Sequential:
        layers: list[nn.Module] = []
        for layer in specs:
            op = layer["op"]
            if op == "conv":
                layers.append(
                    nn.Conv2d(
                        layer["in"],
                        layer["out"],
                        layer["kernel"],
                        padding=layer["padding"],
                        groups=layer["groups"],
                        bias=layer["bias"],
                    )
                )
            elif op == "prelu":
                layers.append(nn.PReLU(layer["channels"]))
            elif op == "leaky_relu":
                layers.append(nn.LeakyReLU(layer["slope"]))
            elif op == "maxpool":
                layers.append(nn.MaxPool2d(layer["kernel"]))
            elif op == "residual":
                layers.append(Residual(build(layer["layers"])))
            else:
                raise BackendError(f"folded model has an unknown layer {op!r}; republish with this version")
        return nn.Sequential(*layers)

    if spec.get("format") != FOLDED_FORMAT:
        raise BackendError(f"unknown folded-model format {spec.get('format')!r}; republish with this version")
    head = spec["classifier"]
    model = Folded(build(spec["layers"]), nn.Linear(head["in"], head["out"]))
    model.load_state_dict(spec["state_dict"])
    return model.eval()


def load_module(path: str):
    """(module, portable): a folded module built from `model.onnx` or `model.folded.pt`, or a
    `torch.export` program (not portable: its normalization runs in fp32 under autocast)."""
    import torch

    if path.endswith(".pt2"):
        return torch.export.load(path).module(), False
    return build_folded(load_spec(path)), True


def load_spec(path: str) -> dict:
    """The folded spec (layers and state dict) in `model.onnx` or `model.folded.pt`."""
    if path.endswith(".onnx"):
        from quicknet.serve.backends.folded_onnx import folded_spec_from_onnx

        return folded_spec_from_onnx(Path(path))
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@dataclass
class _Lane:
    stream: object
    pinned_in: object  # torch uint8 [max, 32, 32, 3], page-locked
    pinned_out: object  # torch float32 [max, 10], page-locked
    graphs: dict  # bucket -> (CUDAGraph, static input, static output)


class TorchBackend:
    name = "torch"

    def __init__(self, module, device: str, settings: Settings, path: str, portable: bool):
        import torch

        self.torch = torch
        self.module = module
        self.device = device
        self.path = path
        self.portable = portable
        self.max_batch_size = settings.max_batch_size
        self.buckets = warmup_sizes(settings.max_batch_size)
        self.lanes: queue.Queue[_Lane] = queue.Queue()
        if device == "cuda":
            for _ in range(settings.instances):
                self.lanes.put(self._new_lane())

    @classmethod
    def load(cls, version: ModelVersion, settings: Settings) -> TorchBackend:
        try:
            import torch
        except ImportError:
            raise BackendError("torch is not installed: the torch backend needs the build or gpu extra") from None
        fname = version.weights_file
        if not fname or not version.file(fname).is_file():
            raise BackendError(f"{version.name} v{version.version} has no torch or ONNX artifact; republish it")
        try:
            module, portable = load_module(str(version.file(fname)))
        except BackendError:
            raise
        except Exception as e:  # a torch.export file from another torch, or a damaged file
            raise BackendError(f"torch {torch.__version__} cannot load {fname} ({e}); republish the model") from None
        if fname.endswith(".onnx"):
            from quicknet.serve.backends.folded_onnx import check_against_onnx

            check_against_onnx(module, version.file(fname), settings.threads)  # before any cast or device move
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(settings.threads)
        else:
            # Every bucket's shape is fixed and captured once: let cuDNN time its algorithms in the
            # warm-up runs before capture (seconds in all, at start-up only).
            torch.backends.cudnn.benchmark = True
            module = module.to(device, memory_format=torch.channels_last)
            if portable:  # its normalization runs in the weights' dtype; a torch.export program uses autocast
                module = module.half()
        return cls(module, device, settings, str(version.file(fname)), portable)

    def _forward(self, x):
        torch = self.torch
        half_by_autocast = self.device == "cuda" and not self.portable
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=half_by_autocast):
            return self.module(x).float()

    def _new_lane(self) -> _Lane:
        torch = self.torch
        n = self.max_batch_size
        return _Lane(
            stream=torch.cuda.Stream(),
            pinned_in=torch.empty((n, 32, 32, 3), dtype=torch.uint8).pin_memory(),
            pinned_out=torch.empty((n, 10), dtype=torch.float32).pin_memory(),
            graphs={},
        )

    def _capture(self, lane: _Lane) -> None:
        """One graph per bucket, largest first, sharing one memory pool within the lane."""
        torch = self.torch
        pool = None
        with torch.cuda.stream(lane.stream):
            for size in sorted(self.buckets, reverse=True):
                static_in = torch.zeros((size, 32, 32, 3), dtype=torch.uint8, device="cuda")
                for _ in range(3):  # warm kernels (cuDNN picks algorithms) and the allocator before capture
                    self._forward(static_in)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=lane.stream, capture_error_mode="thread_local"):
                    static_out = self._forward(static_in)
                pool = pool or graph.pool()
                lane.graphs[size] = (graph, static_in, static_out)
        lane.stream.synchronize()

    def _bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        if self.device == "cpu":
            return self._forward(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.uint8))).numpy()
        n = len(batch)
        lane = self.lanes.get()
        try:
            if not lane.graphs:
                self._capture(lane)
            graph, static_in, static_out = lane.graphs[self._bucket(n)]
            lane.pinned_in.numpy()[:n] = batch
            with torch.cuda.stream(lane.stream):
                static_in[:n].copy_(lane.pinned_in[:n], non_blocking=True)
                graph.replay()
                lane.pinned_out[:n].copy_(static_out[:n], non_blocking=True)
            lane.stream.synchronize()
            return lane.pinned_out.numpy()[:n].copy()
        finally:
            self.lanes.put(lane)

    def warmup(self) -> None:
        if self.device == "cuda":
            lanes = [self.lanes.get() for _ in range(self.lanes.qsize())]
            for lane in lanes:
                self._capture(lane)
                self.lanes.put(lane)
        for n in self.buckets:
            self.infer(np.zeros((n, 32, 32, 3), dtype=np.uint8))

    def describe(self) -> dict:
        torch = self.torch
        desc = {"backend": self.name, "file": self.path, "device": self.device}
        if self.device == "cuda":
            desc |= {"gpu": torch.cuda.get_device_name(), "dtype": "float16", "cuda_graphs": True}
            desc["lanes"] = self.lanes.qsize()
        else:
            desc["threads"] = torch.get_num_threads()
        return desc
