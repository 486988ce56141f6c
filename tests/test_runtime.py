from __future__ import annotations

import logging

import pytest

from quicknet.serve.config import Settings
from quicknet.serve.errors import ModelNotFound, NotAccepting
from quicknet.serve.runtime import Runtime


def test_serving_refuses_until_ready_and_while_draining():
    runtime = Runtime(Settings())
    with pytest.raises(NotAccepting, match="not ready yet") as err:
        runtime.serving()
    assert err.value.reason == "not_ready"
    runtime.draining = True
    with pytest.raises(NotAccepting, match="shutting down") as err:
        runtime.serving("quicknet-xs")
    assert err.value.reason == "draining"


def test_select_and_get_name_what_is_missing():
    runtime = Runtime(Settings())
    assert runtime.select() == []
    with pytest.raises(ModelNotFound, match="'nope' is not served"):
        runtime.select("nope")


def test_the_workers_default_follows_the_cores(monkeypatch, tmp_path):
    import os

    from quicknet.serve import config

    v2, v1 = tmp_path / "cpu.max", tmp_path / "cpu" / "cpu.cfs_quota_us"
    monkeypatch.setattr(config, "CPU_LIMIT_FILES", (v2, v1))  # neither exists: no cgroup limit
    for cores, expected in ((2, 1), (4, 1), (8, 4), (16, 8), (64, 16)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert Settings().front_workers == expected, cores
    assert Settings(workers=3).front_workers == 3
    # a container limited to fewer cores than the host shows it (`docker run --cpus`, a pod's limit)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    for cpu_max, expected in (("200000 100000", 1), ("850000 100000", 4), ("max 100000", 16)):
        v2.write_text(cpu_max + "\n")
        assert Settings().front_workers == expected, cpu_max
    v2.unlink()
    v1.parent.mkdir()
    (v1.parent / "cpu.cfs_period_us").write_text("100000\n")
    for quota, expected in (("400000", 1), ("-1", 16)):  # cgroup v1: -1 is no limit
        v1.write_text(quota + "\n")
        assert Settings().front_workers == expected, quota


def test_a_gpu_is_found_without_torch(monkeypatch):
    import builtins

    from quicknet.serve import gpu

    real_import = builtins.__import__

    def no_nvml(name, *args, **kwargs):
        if name in ("pynvml", "torch"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nvml)
    for devices, expected in (([], False), (["/dev/nvidia0"], True)):
        gpu.gpu_present.cache_clear()
        monkeypatch.setattr(gpu.glob, "glob", lambda _pattern, d=devices: d)
        assert gpu.gpu_present() is expected
    gpu.gpu_present.cache_clear()


def test_a_counter_nvml_does_not_give_leaves_the_others_sampled(monkeypatch, caplog):
    """Utilization is not supported on a MIG slice: that NVML error ended the sampling task, and the
    memory gauge went silent with it. It is said once, and the other counters go on."""
    import asyncio
    import types

    from quicknet.serve import gpu, metrics

    class NotSupported(Exception):
        pass

    def unsupported(_handle):
        raise NotSupported("Not Supported")

    reads = []
    fake = types.SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"gpu{i}",
        nvmlDeviceGetUtilizationRates=unsupported,
        nvmlDeviceGetMemoryInfo=lambda h: reads.append(h) or types.SimpleNamespace(used=123 * len(reads)),
    )
    monkeypatch.setattr(gpu.nvml, "started", lambda: fake)

    async def three_rounds():
        task = asyncio.create_task(gpu.sample_forever(interval_s=0))
        for _ in range(1000):
            if len(reads) >= 3 or task.done():
                break
            await asyncio.sleep(0)
        assert not task.done(), "the sampler ended"
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="quicknet.gpu"):
        asyncio.run(three_rounds())
    assert len(reads) >= 3, "memory is sampled each round"
    assert metrics.GPU_MEMORY_USED.labels("0")._value.get() == 123 * len(reads)
    assert ("0",) not in metrics.GPU_UTILIZATION._metrics, "unset: not exported as 0% busy"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "quicknet.gpu"]
    assert line == "GPU 0: NVML gives no utilization (Not Supported); its gauge stays unset"


def test_list_and_dict_settings_take_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("QUICKNET_PREFERRED_BATCH_SIZES", "[8, 16]")
    monkeypatch.setenv("QUICKNET_VERSION_POLICIES", '{"quicknet-xs": "all"}')
    s = Settings()
    assert s.preferred_batch_sizes == [8, 16] and s.version_policies == {"quicknet-xs": "all"}


def test_serving_refuses_before_the_body_when_the_queue_is_full():
    """`serving()` is every front's first step: a full queue refuses there, before any body is read."""
    from quicknet.serve.errors import QueueFull
    from quicknet.serve.model import ModelHandle, ModelInfo

    class Full(ModelHandle):
        info = ModelInfo("m", 1, ("a",), {}, "fake", {}, 8)

        def admit(self) -> None:
            raise QueueFull(2.0)

    runtime = Runtime(Settings())
    runtime.install([Full()], "m")
    with pytest.raises(QueueFull):
        runtime.serving()
    with pytest.raises(QueueFull):
        runtime.serving("m", 1)


def test_top_k_in_plain_python_agrees_with_numpy_ties_included():
    """A few rows take the plain-Python top-k (the one-image hot path), many the numpy one: the
    same classes in the same order (ties: the lower index first) and the same probabilities."""
    import numpy as np

    from quicknet.serve import model

    labels = tuple("abcdefghij")
    rng = np.random.default_rng(3)
    rows = (rng.normal(size=(200, 10)) * rng.uniform(0.1, 30, size=(200, 1))).astype(np.float32)
    rows[:20, 3] = rows[:20, 7] = rows[:20].max(axis=1) + 1  # a tie at the top
    rows[20:40] = 0.5  # all equal
    step = model.SMALL_BATCH  # the largest batch that takes the plain-Python path
    real, rows_seen = model._top_k_row, []

    def counted(row, k, labels):
        rows_seen.append(row)
        return real(row, k, labels)

    model._top_k_row = counted
    try:
        small = [p for i in range(0, 200, step) for p in model.top_k(rows[i : i + step], 5, labels)]
        assert len(rows_seen) == 200, "every row of a batch of SMALL_BATCH or fewer took the plain-Python path"
        large = model.top_k(rows, 5, labels)
        assert len(rows_seen) == 200, "a larger batch took numpy's"
    finally:
        model._top_k_row = real
    for a, b in zip(small, large, strict=True):
        assert [p.index for p in a] == [p.index for p in b]
        assert [p.score for p in a] == pytest.approx([p.score for p in b], rel=1e-12, abs=1e-15)
        assert [p.label for p in a] == [labels[p.index] for p in a]
    assert [p.index for p in small[0][:2]] == [3, 7]
    assert [p.index for p in small[20]] == [0, 1, 2, 3, 4]
