"""What machine a GPU job ran on, and the ceilings its numbers are compared with.

Runs under the GPU machine's own Python (torch, numpy; no project extras) and, for the dry runs
the tests drive, on the CPU. Every probe is bounded in time.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

from quicknet import nvml


def environment() -> dict:
    """GPU name, driver, CUDA/cuDNN/torch/triton versions, Python, CPU count."""
    import torch

    env: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "device": "cuda",
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "cudnn": torch.backends.cudnn.version(),
            "driver": nvml.driver_version(),
        }
    else:
        env |= {"device": "cpu", "gpu": None, "cpu": cpu_description()}
    return env


def cpu_description() -> str:
    """`AMD EPYC, 2 cores`: the CPU model from /proc/cpuinfo where there is one, and usable cores."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


def matmul_tflops(seconds: float = 2.0, n: int = 8192) -> dict:
    """Dense bf16 matmul throughput for `seconds` (the ceiling compute is compared with).
    On a CPU (dry runs) a small fp32 matmul stands in, so the code path is the same."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        n = min(n, 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    device = "cuda" if cuda else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(cuda)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ b
        count += 10
        _sync(cuda)
    elapsed = time.perf_counter() - start
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "tflops": round(2 * n**3 * count / elapsed / 1e12, 2)}


def copy_bandwidth(seconds: float = 1.0, mib: int = 256) -> dict:
    """Host↔device copy GB/s from pinned and pageable memory (the serving engine copies each batch)."""
    import torch

    if not torch.cuda.is_available():
        return {"note": "no GPU: nothing to measure"}
    nbytes = mib << 20
    device_buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for kind, host in (
        ("pinned", torch.empty(nbytes, dtype=torch.uint8).pin_memory()),
        ("pageable", torch.empty(nbytes, dtype=torch.uint8)),
    ):
        for direction in ("h2d", "d2h"):
            src, dst = (host, device_buf) if direction == "h2d" else (device_buf, host)
            dst.copy_(src, non_blocking=kind == "pinned")
            torch.cuda.synchronize()
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 4:
                dst.copy_(src, non_blocking=kind == "pinned")
                torch.cuda.synchronize()
                count += 1
            out[f"{kind}_{direction}_gb_s"] = round(nbytes * count / (time.perf_counter() - start) / 1e9, 1)
    return out


class ResultsFile:
    """`results.json` and `results.md` of a GPU job, rewritten after every step (saving as it goes:
    a run cut short by its time limit still returns what it measured)."""

    def __init__(self, out, job: str, render):
        from datetime import UTC, datetime

        self.out = out
        self.render = render
        self.doc: dict = {"job": job, "started": datetime.now(UTC).isoformat(timespec="seconds")}

    def update(self, **fields) -> None:
        import json

        from quicknet.fsutil import write_text_atomic

        self.doc.update(fields)
        write_text_atomic(self.out / "results.json", json.dumps(self.doc, indent=2, default=str) + "\n")
        write_text_atomic(self.out / "results.md", self.render(self.doc))


class UtilizationSampler:
    """Mean GPU utilization (NVML) over a window, sampled every 50 ms in a thread; None without NVML."""

    def __init__(self) -> None:
        import threading

        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            self._nvml = nvml.started()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no nvidia-ml-py or no GPU
            self._nvml = None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self) -> UtilizationSampler:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(sum(self.samples) / len(self.samples) / 100, 3) if self.samples else None


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def command_line() -> str:
    return " ".join([os.path.basename(sys.executable), *sys.argv])
