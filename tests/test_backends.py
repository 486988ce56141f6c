"""Engines behind the one face. TensorRT cannot be installed in this workplace: its tests skip there."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from quicknet import store
from quicknet.serve.backends import BackendError, choose, load_backend, warmup_sizes
from quicknet.serve.config import Settings
from quicknet.testing import STORE

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def version() -> store.ModelVersion:
    return store.get_version(STORE, store.default_model(STORE))


@pytest.fixture(scope="module")
def batch(cifar) -> np.ndarray:
    return cifar.test.sample(33, seed=5).images


def test_warmup_covers_every_bucket():
    assert warmup_sizes(64) == [1, 2, 4, 8, 16, 32, 64]
    assert warmup_sizes(48) == [1, 2, 4, 8, 16, 32, 48]
    assert warmup_sizes(1) == [1]


def test_auto_picks_onnxruntime_on_a_cpu_machine(version):
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here; auto may pick it")
    import torch

    expected = "torch" if torch.cuda.is_available() else "onnxruntime"
    assert choose(version, Settings()) == expected


def test_onnxruntime_fp32_and_int8(version, batch):
    fp32 = load_backend(version, Settings(backend="onnxruntime"))
    fp32.warmup()
    logits = fp32.infer(batch)
    assert logits.shape == (33, 10) and logits.dtype == np.float32
    if not version.metadata["artifacts"].get("onnx-int8"):
        pytest.skip("the shipped version has no INT8 model")
    int8 = load_backend(version, Settings(backend="onnxruntime", precision="int8"))
    agree = (int8.infer(batch).argmax(1) == logits.argmax(1)).mean()
    assert agree >= 0.85


def test_torch_backend_matches_onnxruntime(version, batch):
    pytest.importorskip("torch")
    ort = load_backend(version, Settings(backend="onnxruntime", precision="fp32"))
    tb = load_backend(version, Settings(backend="torch", max_batch_size=64))
    tb.warmup()
    got, ref = tb.infer(batch), ort.infer(batch)
    tolerance = 5e-2 if tb.device == "cuda" else 1e-4  # fp16 on CUDA
    assert np.abs(got - ref).max() < tolerance
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97
    assert tb.describe()["backend"] == "torch"


def test_forced_backend_that_cannot_load_fails_clearly(version, tmp_path):
    if not HAS_TENSORRT:
        with pytest.raises(BackendError, match="TensorRT is not installed"):
            load_backend(version, Settings(backend="tensorrt"))
    bare = store.publish(
        tmp_path, "m", [version.file("model.onnx")], {"labels": [], "artifacts": {"onnx": "model.onnx"}}
    )
    int8_only = store.publish(
        tmp_path, "n", [version.file("model.int8.onnx")], {"labels": [], "artifacts": {"onnx-int8": "model.int8.onnx"}}
    )
    with pytest.raises(BackendError, match="has no torch or ONNX artifact"):
        load_backend(int8_only, Settings(backend="torch"))
    with pytest.raises(BackendError, match="no onnx-int8 model"):
        load_backend(bare, Settings(backend="onnxruntime", precision="int8"))


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed (cannot be in this workplace; CI never has it)")
def test_tensorrt_plan_matches_onnxruntime(version, batch, tmp_path):
    from quicknet.build.compile import TensorRTOptions, build_tensorrt_plan

    plan = build_tensorrt_plan(version.file("model.onnx"), tmp_path, TensorRTOptions())
    backend = load_backend(version, Settings(backend="tensorrt", plan_dir=tmp_path))
    backend.warmup()
    ref = load_backend(version, Settings(backend="onnxruntime")).infer(batch)
    got = backend.infer(batch)
    assert plan.is_file() and (got.argmax(1) == ref.argmax(1)).mean() >= 0.97


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_compile_skips_tensorrt_with_a_reason(tmp_path, version):
    from quicknet.build.compile import TensorRTOptions, build_tensorrt_plan
    from quicknet.errors import BuildError

    with pytest.raises(BuildError, match="TensorRT is not installed"):
        build_tensorrt_plan(version.file("model.onnx"), tmp_path, TensorRTOptions())


def test_auto_precision_times_fp32_and_int8_and_respects_the_accuracy_gate(version, tmp_path):
    chosen = load_backend(version, Settings(backend="onnxruntime")).describe()
    choice = chosen["precision_choice"]
    assert choice["rule"] == "auto" and set(choice["timings"]) == {"fp32", "int8"}
    t = choice["timings"]
    speedup = math.sqrt(
        (t["fp32"]["batch_1_ms"] / t["int8"]["batch_1_ms"])
        * (t["fp32"]["max_batch_ms_per_image"] / t["int8"]["max_batch_ms_per_image"])
    )
    assert choice["int8_speedup"] == round(speedup, 3)
    assert chosen["precision"] == ("int8" if speedup >= 1.25 else "fp32"), "INT8 where clearly faster, as timed"
    key = "onnx" if chosen["precision"] == "fp32" else "onnx-int8"
    assert chosen["file"].endswith(version.metadata["artifacts"][key])
    files = [version.file(f) for f in version.metadata["files"]]
    fp32 = version.metadata["accuracy"]["onnx"]["top1"]

    def with_int8_at(top1: float):
        meta = {k: v for k, v in version.metadata.items() if k not in ("name", "version", "files")}
        meta["accuracy"] = {**meta["accuracy"], "onnx-int8": {**meta["accuracy"]["onnx-int8"], "top1": top1}}
        return store.publish(tmp_path, version.name, files, meta)

    near = load_backend(with_int8_at(fp32 - 0.0049), Settings(backend="onnxruntime")).describe()
    assert "timings" in near["precision_choice"], "0.49 point down: INT8 is a candidate"
    worse = with_int8_at(fp32 - 0.0051)
    gated = load_backend(worse, Settings(backend="onnxruntime")).describe()
    assert gated["precision"] == "fp32" and "timings" not in gated["precision_choice"], "0.51 point down: never"
    forced = load_backend(worse, Settings(backend="onnxruntime", precision="int8")).describe()
    assert forced["precision"] == "int8" and forced["file"].endswith("model.int8.onnx")


def test_portable_folded_weights_rebuild_the_same_model(tmp_path, cifar):
    """`model.folded.pt` (a layer list and a state dict, loadable by any torch) rebuilds exactly the
    folded model the build made: per-channel PReLU, bias-free depthwise convolutions and all."""
    import torch

    from quicknet.build.export import export_folded_weights

    folded = _trained_like_xs()
    weights = export_folded_weights(folded, tmp_path / "model.folded.pt")
    meta = {"labels": list("0123456789"), "artifacts": {"torch": "model.folded.pt"}}
    mv = store.publish(tmp_path / "store", "m", [weights], meta)
    backend = load_backend(mv, Settings(backend="torch", max_batch_size=16))
    images = cifar.test.images[:16]
    with torch.no_grad():
        want = folded(torch.from_numpy(images)).numpy()
    assert np.abs(backend.infer(images) - want).max() < 1e-5
    assert backend.describe()["file"].endswith("model.folded.pt")


def _trained_like_xs():
    """A folded quicknet-xs with per-channel PReLU slopes and BN statistics, as training leaves them."""
    import torch

    from quicknet.build.fold import fold
    from quicknet.build.model import build_model
    from tests.trained import trained_looking

    torch.manual_seed(0)
    return fold(trained_looking(build_model("quicknet-xs"), slopes=(0.0, 0.5)))


def test_the_torch_engine_is_derived_from_model_onnx_and_checked_before_it_serves(tmp_path, cifar, monkeypatch):
    """A version stores its FP32 weights once, in `model.onnx`: the torch engine reads its layers
    and weights back from that graph, and is checked against ONNX Runtime on the file before it
    serves. A graph it cannot read, or a derived model that disagrees, is one line."""
    import torch

    from quicknet.build.export import export_onnx
    from quicknet.serve.backends import folded_onnx

    folded = _trained_like_xs()
    export_onnx(folded, tmp_path / "model.onnx")
    meta = {"labels": list("0123456789"), "artifacts": {"onnx": "model.onnx"}}
    mv = store.publish(tmp_path / "store", "m", [tmp_path / "model.onnx"], meta)
    backend = load_backend(mv, Settings(backend="torch", max_batch_size=16))
    images = cifar.test.images[:16]
    with torch.no_grad():
        want = folded(torch.from_numpy(images)).numpy()
    assert np.abs(backend.infer(images) - want).max() < 1e-4
    assert backend.describe()["file"].endswith("model.onnx")

    real = folded_onnx.folded_spec_from_onnx

    def off_by_a_little(path):
        spec = real(path)
        spec["state_dict"]["classifier.bias"] = spec["state_dict"]["classifier.bias"] + 1.0
        return spec

    monkeypatch.setattr(folded_onnx, "folded_spec_from_onnx", off_by_a_little)
    with pytest.raises(BackendError, match=r"^the torch model derived from model.onnx disagrees with its source"):
        load_backend(mv, Settings(backend="torch"))
    monkeypatch.setattr(folded_onnx, "folded_spec_from_onnx", real)

    import onnx
    from onnx import helper

    graph = onnx.load(tmp_path / "model.onnx")
    graph.graph.node.insert(5, helper.make_node("Sigmoid", [graph.graph.node[4].output[0]], ["odd"]))
    onnx.save(graph, tmp_path / "odd.onnx")
    with pytest.raises(
        BackendError, match=r"^odd.onnx is not a folded QuickNet graph \(Sigmoid .*unexpected operator\)$"
    ):
        folded_onnx.folded_spec_from_onnx(tmp_path / "odd.onnx")


def test_load_time_timings_take_turns_so_a_burst_of_load_misleads_no_choice():
    """Sessions timed at load (one thread or two for one image, FP32 or INT8) take turns: a burst
    of load at the start (the service's other processes starting on the same cores) slows them
    alike. Timed one after the other, the burst covered every run of the faster one, and it lost."""
    import time

    from quicknet.serve.backends.onnxruntime import seconds_per_image

    calls = 0

    class Session:
        def __init__(self, seconds: float):
            self.seconds = seconds

        def run(self, _outputs, _feeds):
            nonlocal calls
            calls += 1
            time.sleep(self.seconds + (0.05 if calls <= 8 else 0.0))  # the first 8 calls share the cores

    fast, slow = Session(0.001), Session(0.01)
    fast_s, slow_s = seconds_per_image([fast, slow], "images", 1, 5)
    assert fast_s < 0.008 and fast_s < slow_s < 0.03  # each its best clean run (a mean would be ~0.03 / 0.04)


def test_auto_picks_the_torch_engine_for_an_onnx_only_version_only_where_it_can_derive_it(version, monkeypatch):
    """On a GPU with torch, a version holding only model.onnx is served by the torch engine, which
    derives its model with the onnx package; without that package auto falls back to ONNX Runtime
    instead of failing the load."""
    import importlib.util

    import torch

    import quicknet.serve.gpu

    monkeypatch.setattr(quicknet.serve.gpu, "gpu_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    assert "torch" not in version.metadata["artifacts"] and choose(version, Settings()) == "torch"
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tensorrt", "onnx") else real(name, *a)
    )
    assert choose(version, Settings()) == "onnxruntime"


def test_engine_threads_spin_only_while_a_run_lasts_one_session_no_memory_patterns(version):
    """Spinning between a run's operators (a futex wake each, otherwise: 1.25x slower on one image
    here), never between runs (that CPU is the server's)."""
    from quicknet.serve.backends.onnxruntime import OnnxRuntimeBackend

    backend = OnnxRuntimeBackend.load(version, Settings(backend="onnxruntime", precision="fp32"))
    options = backend.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.get_session_config_entry("session.dynamic_block_base") == "4"
    assert options.enable_mem_pattern is False, "no planned block kept per batch size"
    assert backend.describe()["threads"] == 2 and not hasattr(backend, "single"), "one session, every batch size"
