"""QuickNet's PReLUs in ONNX Runtime's fast form (quicknet/ort_graph.py): the FP32 graph the CPU
engine serves (rewritten at load, checked against the file before it serves) and the graph the
INT8 model is quantized from."""

from __future__ import annotations

import logging
import platform
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from quicknet import ort_graph as og
from quicknet import store
from quicknet.serve.backends import BackendError, load_backend
from quicknet.serve.backends.derived import check_logits
from quicknet.serve.backends.onnxruntime import open_session
from quicknet.serve.config import Settings
from quicknet.testing import STORE


@pytest.fixture(scope="module")
def version() -> store.ModelVersion:
    return store.get_version(STORE, "quicknet-xs")


@pytest.fixture(scope="module")
def source(version) -> str:
    return str(version.file(version.metadata["artifacts"]["onnx"]))


def _logits(model: str | bytes, images: np.ndarray) -> np.ndarray:
    session = open_session(ort, model, 2)
    return session.run(None, {"images": images})[0]


def _slopes(path: str) -> list[np.ndarray]:
    return [numpy_helper.to_array(t).reshape(-1) + 1 for t in onnx.load(path).graph.initializer if "slope" in t.name]


def test_the_rewrite_is_the_same_function_in_both_forms(source, cifar):
    """The shipped quicknet-xs has both kinds of layer: its stem has a channel with slope > 1 (the
    form with one more pass), every other layer only slopes <= 1."""
    slopes = _slopes(source)
    assert (slopes[0] > 1).any() and all((s <= 1).all() for s in slopes[1:]), "the model exercises both forms"
    model = onnx.load(source)
    assert og.blocked_prelu(model) == 9
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["Min"] == 0 and ops["Relu"] == 9
    assert ops["Conv"] == 17 + 18, "two 1x1 depthwise scalings an activation"
    assert not any("slope_minus_1" in t.name or t.name.endswith("_zero") for t in model.graph.initializer)
    images = np.concatenate([cifar.test.images[:7], np.zeros((1, 32, 32, 3), np.uint8) + 255])
    want, got = _logits(source, images), _logits(model.SerializeToString(), images)
    assert np.abs(got - want).max() < 1e-4
    assert np.array_equal(got.argmax(1), want.argmax(1))


def _blocked_layout_changes(model: str | bytes, tmp_path, name: str) -> int:
    """How many times ORT's optimized graph leaves its blocked layout (ReorderOutput nodes)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return sum(n.op_type == "ReorderOutput" for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="ORT's blocked (NCHWc) layout is x86-64's"
)
def test_the_rewritten_graph_stays_in_orts_blocked_layout(source, tmp_path):
    """Why it exists: the published form leaves the blocked layout at every activation (9 times);
    the rewritten one only once, before the global average pool."""
    model = onnx.load(source)
    og.blocked_prelu(model)
    assert _blocked_layout_changes(source, tmp_path, "published") == 9
    assert _blocked_layout_changes(model.SerializeToString(), tmp_path, "rewritten") == 1


def test_the_fp32_engine_serves_the_rewritten_graph_checked(version, source, cifar):
    backend = load_backend(version, Settings(backend="onnxruntime", precision="fp32"))
    described = backend.describe()
    assert described["graph"] == og.REWRITE and described["prelus_rewritten"] == 9
    assert 0 <= described["max_logit_delta"] < 1e-4, "checked against model.onnx before it served"
    assert described["file"] == source, "the published file is what it derives from and names"
    images = cifar.test.images[:5]
    assert np.abs(backend.infer(images) - _logits(source, images)).max() < 1e-4


@pytest.mark.parametrize("factor", [1.5, 1.01])  # 1.01: logits off by ~0.04, every top-1 class the same
def test_a_rewrite_that_disagrees_is_refused_and_the_published_graph_serves(
    version, source, monkeypatch, caplog, factor
):
    real = og.blocked_prelu

    def off(model):
        n = real(model)
        for t in model.graph.initializer:
            if t.name.endswith("_linear_weight"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * factor, t.name))
        return n

    monkeypatch.setattr("quicknet.serve.backends.onnxruntime.blocked_prelu", off)
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        backend = load_backend(version, Settings(backend="onnxruntime", precision="fp32"))
    described = backend.describe()
    assert described["graph"] == "as published" and "disagrees with its source" in described["why"]
    assert "max |Δlogit|" in described["why"]
    (line,) = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert line.endswith("serving model.onnx as published") and "\n" not in line
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.abs(backend.infer(images) - _logits(source, images)).max() < 1e-5


def test_the_check_refuses_another_top_1_class_even_within_the_tolerance():
    expected = np.array([[1.0, 1.0000001, 0.0], [0.0, 2.0, 1.0]], np.float32)
    assert check_logits(expected + 1e-6, expected, "x") <= 1e-5
    swapped = expected.copy()
    swapped[0, :2] = swapped[0, 1::-1]  # the first image's two near-equal top logits trade places
    with pytest.raises(BackendError, match=r"^x disagrees with its source \(another top-1 class\)$"):
        check_logits(swapped, expected, "x")


@pytest.mark.parametrize("where", ["load", "run"])
def test_a_rewritten_graph_ort_cannot_load_or_run_falls_back_to_the_published_one(
    version, source, monkeypatch, caplog, where
):
    real = og.blocked_prelu

    def broken(model):
        n = real(model)
        if where == "load":  # an operator ORT does not know
            model.graph.node.append(helper.make_node("NoSuchOp", [model.graph.node[-1].output[0]], ["nowhere"]))
        else:  # loads, then fails on its first run: the logits reshaped through a shape 16 images do not fit
            last = model.graph.node[-1]
            out = last.output[0]
            last.output[0] = "pre"
            for name, shape in (("thirds", [3, -1]), ("back", [-1, 10])):
                model.graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name))
            model.graph.node.append(helper.make_node("Reshape", ["pre", "thirds"], ["in_thirds"]))
            model.graph.node.append(helper.make_node("Reshape", ["in_thirds", "back"], [out]))
        return n

    monkeypatch.setattr("quicknet.serve.backends.onnxruntime.blocked_prelu", broken)
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        backend = load_backend(version, Settings(backend="onnxruntime", precision="fp32"))
    described = backend.describe()
    assert described["graph"] == "as published", described
    (line,) = [r.getMessage() for r in caplog.records if "as published" in r.getMessage()]
    assert line.endswith("serving model.onnx as published") and "\n" not in line
    images = np.random.default_rng(4).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    assert np.abs(backend.infer(images) - _logits(source, images)).max() < 1e-5


@pytest.mark.parametrize(
    ("int8_s", "faster"),
    [(0.002, "fp32"), (0.0005, "int8"), (0.00085, "fp32")],  # the last: INT8 1.18x, within noise
)
def test_with_auto_precision_only_what_serves_is_checked(version, monkeypatch, int8_s, faster):
    """The timings decide (fixed here: on quicknet-xs FP32 and INT8 are within a few percent, and
    INT8 serves only where it is at least 1.25x faster, so a start does not flip a coin)."""
    import quicknet.serve.backends.onnxruntime as backend_module

    calls = []
    real = backend_module.source_logits
    monkeypatch.setattr(backend_module, "source_logits", lambda *a, **k: calls.append(a) or real(*a, **k))
    times = [0.001, int8_s]  # sessions are timed in the order FP32, INT8
    monkeypatch.setattr(backend_module, "seconds_per_image", lambda sessions, *a: times)
    described = load_backend(version, Settings(backend="onnxruntime")).describe()
    assert described["precision"] == faster
    assert len(calls) == (1 if faster == "fp32" else 0), "one check, for the FP32 graph, only where it serves"
    assert ("max_logit_delta" in described) == (faster == "fp32")
    assert described["graph"] == (og.REWRITE if faster == "fp32" else "as published")


def _tiny(zero: float = 0.0, slope_shape: tuple = (1, 8, 1, 1), extra_use: str = "", add_other: bool = False, low=-1.2):
    """Conv -> Min(x, zero) -> Mul(slope - 1) -> Add(x, ·): the exporter's PReLU, or a near miss."""
    c = 8
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(zero, np.float32), "zero"),
        numpy_helper.from_array(rng.uniform(low, 0.2 if low < -1 else -0.01, slope_shape).astype(np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w"], ["y2"], pads=[1, 1, 1, 1]),
        helper.make_node("Min", ["y", "zero"], ["n"]),
        helper.make_node("Mul", ["n", "k"], ["s"]),
        helper.make_node("Add", ["y2" if add_other else "y", "s"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)]
    if extra_use:
        outputs.append(helper.make_tensor_value_info(extra_use, onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 8, 8])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_only_the_exporters_exact_form_is_rewritten():
    assert og.blocked_prelu(_tiny()) == 1
    assert og.blocked_prelu(_tiny(zero=0.5)) == 0, "Min against something other than 0"
    assert og.blocked_prelu(_tiny(slope_shape=(8,))) == 0, "a slope that is not one per channel"
    assert og.blocked_prelu(_tiny(extra_use="n")) == 0, "the Min's output used elsewhere"
    assert og.blocked_prelu(_tiny(extra_use="s")) == 0, "the Mul's output used elsewhere"
    assert og.blocked_prelu(_tiny(add_other=True)) == 0, "an Add of another tensor than the Min's input"


@pytest.mark.parametrize("low", [-1.2, -0.9], ids=["a-slope-above-1", "every-slope-below-1"])
def test_the_rewrite_computes_the_prelu_in_both_forms(low):
    model = _tiny(low=low)
    slopes = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "k")).reshape(-1) + 1
    assert (slopes > 1).any() == (low < -1), "each case takes the form it names"
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32) * 3
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert og.blocked_prelu(model) == 1
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (want < 0).any() and (want > 0).any()
    assert np.abs(got - want).max() < 1e-5
