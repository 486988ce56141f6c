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
    counters = (
        ("utilization", metrics.GPU_UTILIZATION, lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu / 100),
        ("memory", metrics.GPU_MEMORY_USED, lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used),
    )
    said: set[tuple[int, str]] = set()
    while True:
        for i, handle in enumerate(handles):
            for what, gauge, read in counters:
                # One counter NVML does not give (utilization on a MIG slice, a GPU fallen off the
                # bus) is said once and passed over; it must not end the sampling of the others.
                try:
                    value = read(handle)  # before labels(): a child once made is exported, at 0
                except Exception as e:
                    if (i, what) not in said:
                        said.add((i, what))
                        log.warning("GPU %d: NVML gives no %s (%s); its gauge stays unset", i, what, e)
                else:
                    gauge.labels(str(i)).set(value)
        await asyncio.sleep(interval_s)
