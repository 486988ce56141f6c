"""NVIDIA's management library (NVML, the `nvidia-ml-py` package), asked without torch or a CUDA
context: GPU 0's name and compute capability, the driver's version, a started NVML for counters.

One leaf shared by the store (TensorRT plans are named for a GPU), the fused engine (what it was
built for), the build's probe and the service (its backend choice, its GPU gauges). Importing this
module imports nothing: `pynvml` is imported on the first call, and where it is missing or NVML
cannot start (no driver, no GPU) the call raises (ImportError, or NVML's own error family), which
each caller turns into what its case needs.
"""

from __future__ import annotations

import subprocess


def started():
    """`pynvml`, with NVML started (a second start is a no-op: NVML counts them)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def gpu0() -> tuple[str, tuple[int, int]]:
    """Name and compute capability of GPU 0."""
    nvml = started()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
    return _text(nvml.nvmlDeviceGetName(handle)), (int(major), int(minor))


def driver_version() -> str | None:
    """The NVIDIA driver version through NVML, else nvidia-smi; None when neither answers."""
    try:
        return _text(started().nvmlSystemGetDriverVersion())
    except Exception:  # no nvidia-ml-py, or NVML cannot start: ask nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def _text(value: str | bytes) -> str:
    """NVML answers bytes in older nvidia-ml-py releases, str in newer ones."""
    return value.decode() if isinstance(value, bytes) else value
