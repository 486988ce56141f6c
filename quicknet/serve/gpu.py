"""Is there a GPU (asked without torch), and its utilization and memory through NVML, sampled in
the background where a GPU and nvidia-ml-py are present; elsewhere it does nothing."""

from __future__ import annotations

import asyncio
import functools
import glob
import logging

from quicknet import nvml
from quicknet.serve import metrics

log = logging.getLogger("quicknet.gpu")


@functools.cache
def gpu_present() -> bool:
    """An NVIDIA GPU is visible: NVML counts one, or (no nvidia-ml-py) a /dev/nvidia<N> device exists.
    Costs microseconds and no torch import, so the backend choice on a CPU machine stays light."""
    try:
        return nvml.started().nvmlDeviceGetCount() > 0
    except Exception:  # no nvidia-ml-py or no driver: fall back to the device files
        return bool(glob.glob("/dev/nvidia[0-9]*"))


async def sample_forever(interval_s: float = 5.0) -> None:
    try:
        pynvml = nvml.started()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no nvidia-ml-py, no driver, or no GPU: nothing to sample
        return
    log.info("sampling %d GPU(s) through NVML every %.0fs", len(handles), interval_s)
    while True:
        for i, handle in enumerate(handles):
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            metrics.GPU_UTILIZATION.labels(str(i)).set(util.gpu / 100)
            metrics.GPU_MEMORY_USED.labels(str(i)).set(memory.used)
        await asyncio.sleep(interval_s)
