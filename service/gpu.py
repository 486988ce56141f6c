"""GPU utilization and memory through NVML, sampled in the background where a GPU and
nvidia-ml-py are present; elsewhere it does nothing."""

from __future__ import annotations

import asyncio
import logging

from service import metrics

log = logging.getLogger("quicknet.gpu")


async def sample_forever(interval_s: float = 5.0) -> None:
    try:
        import pynvml

        pynvml.nvmlInit()
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
