"""The FP32 graph ONNX Runtime serves: model.onnx's PReLUs rewritten at load for ORT's blocked
CPU kernels (quicknet/serve/backends/ort_graph.py), checked against the file before it serves."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from quicknet import store
from quicknet.serve.backends import load_backend
from quicknet.serve.backends import ort_graph as og
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
    assert ops["Min"] == 0 and ops["BatchNormalization"] == 18 and ops["Relu"] == 9
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


def test_a_rewrite_that_disagrees_is_refused_and_the_published_graph_serves(version, source, monkeypatch, caplog):
    real = og.blocked_prelu

    def off(model):
        n = real(model)
        for t in model.graph.initializer:
            if t.name.endswith("_linear_scale"):
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.5, t.name))
        return n

    monkeypatch.setattr("quicknet.serve.backends.onnxruntime.blocked_prelu", off)
    with caplog.at_level(logging.WARNING, logger="quicknet.backends"):
        backend = load_backend(version, Settings(backend="onnxruntime", precision="fp32"))
    described = backend.describe()
    assert described["graph"] == "as published" and "disagrees with its source" in described["why"]
    (line,) = [r.getMessage() for r in caplog.records if "disagrees" in r.getMessage()]
    assert line.endswith("serving model.onnx as published") and "\n" not in line
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.abs(backend.infer(images) - _logits(source, images)).max() < 1e-5


def test_with_auto_precision_only_what_serves_is_checked(version, monkeypatch):
    calls = []
    import quicknet.serve.backends.onnxruntime as backend_module

    real = backend_module.source_logits
    monkeypatch.setattr(backend_module, "source_logits", lambda *a, **k: calls.append(a) or real(*a, **k))
    described = load_backend(version, Settings(backend="onnxruntime")).describe()
    checked = described["precision"] == "fp32"
    assert len(calls) == int(checked), "one check, for the FP32 graph, only where it serves"
    assert ("max_logit_delta" in described) == checked


def _tiny(zero: float, slope_shape: tuple[int, ...], extra_use: bool = False) -> onnx.ModelProto:
    """Conv -> Min(x, zero) -> Mul(slope - 1) -> Add(x, ·): the exporter's PReLU, or a near miss."""
    c = 8
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(zero, np.float32), "zero"),
        numpy_helper.from_array(rng.uniform(-1.2, 0.2, slope_shape).astype(np.float32), "k"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Min", ["y", "zero"], ["n"]),
        helper.make_node("Mul", ["n", "k"], ["s"]),
        helper.make_node("Add", ["y", "s"], ["out"]),
    ]
    outputs = [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("n", onnx.TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])], outputs, inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_only_the_exporters_exact_form_is_rewritten():
    assert og.blocked_prelu(_tiny(0.0, (1, 8, 1, 1))) == 1
    assert og.blocked_prelu(_tiny(0.5, (1, 8, 1, 1))) == 0, "Min against something other than 0"
    assert og.blocked_prelu(_tiny(0.0, (8,))) == 0, "a slope that is not one per channel"
    assert og.blocked_prelu(_tiny(0.0, (1, 8, 1, 1), extra_use=True)) == 0, "the Min's output used elsewhere"
