"""quicknet-res (identity shortcuts around the same-width separable blocks, a gpu-train arm) through
what publishing and serving it takes: fold, ONNX export and its check, the torch engine's model read
back from `model.onnx`, ONNX Runtime's FP32 rewrite and INT8 quantization, and the engines of a
published version. At quicknet-xs widths (the full one scores ~80 images/s on these 2 cores); the
fused GPU engine's shortcut is in test_gpu_engine.py, the gpu-train arm's checkpoint in
test_gpu_jobs.py."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quicknet import store
from quicknet.build.export import export_onnx, folded_spec, reference_logits, verify
from quicknet.build.fold import FoldedResidual, fold
from quicknet.build.model import QuickNet, ResidualSeparableBlock, get_config
from quicknet.serve.backends import load_backend
from quicknet.serve.backends.folded_onnx import check_against_onnx, folded_spec_from_onnx
from quicknet.serve.backends.pytorch import build_folded
from quicknet.serve.config import Settings
from tests.trained import trained_looking

RES_XS = dataclasses.replace(get_config("quicknet-xs"), name="quicknet-res-xs", residual=True)
SHORTCUTS = 6  # 2 of stage 1's blocks, 2 of stage 2's, 2 of stage 3's: the ones that keep their width


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """Trained-looking: BN statistics, per-channel slopes and a classifier that spread the logits (an
    untrained model's are near-constant, and a dropped shortcut could pass a comparison of them).
    One shortcut's block has equal slopes, which fold to a LeakyReLU (every block of a fresh model)."""
    torch.manual_seed(1)
    net = trained_looking(QuickNet(RES_XS), bn_weight=(0.3, 0.8), classifier_std=0.5)  # (0.3, 0.8): 6 sums stay small
    shortcuts = [m for m in net.features if isinstance(m, ResidualSeparableBlock)]
    shortcuts[1].block.act.weight.data.fill_(0.25)
    return net


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    return export_onnx(fold(model), tmp_path_factory.mktemp("res") / "model.onnx")


def _shortcut_adds(path) -> int:
    """Adds of two activations (not of a constant, not the PReLU form's own `x + (s-1)·Min(x, 0)`)."""
    graph = onnx.load(path).graph
    constants = {i.name for i in graph.initializer}
    return sum(
        1
        for n in graph.node
        if n.op_type == "Add" and not constants & set(n.input) and not any(i.endswith("_scaled") for i in n.input)
    )


def test_fold_keeps_each_shortcut_and_computes_the_eval_model(model, test_images):
    folded = fold(model)
    assert sum(isinstance(m, FoldedResidual) for m in folded.features) == SHORTCUTS
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in folded.modules())
    images = test_images.images[:128]
    with torch.no_grad():
        got = folded(torch.from_numpy(images)).numpy()
    want = reference_logits(model, images)
    assert want.std() > 0.5, "logits must spread for the comparison to mean anything"
    assert np.abs(got - want).max() < 1e-4


def test_the_onnx_export_has_the_shortcuts_and_passes_its_check(model, onnx_path, test_images):
    assert _shortcut_adds(onnx_path) == SHORTCUTS
    eq = verify(model, onnx_path, test_images)
    assert eq.ok and eq.top1_agreement == 1.0


def test_the_torch_engines_model_is_read_back_from_model_onnx_with_its_shortcuts(model, onnx_path):
    """The layer list nests each shortcut's layers (`{"op": "residual", "layers": [...]}`) and the
    weights land under the same keys as fold's; the rebuilt model agrees with ONNX Runtime."""
    spec, back = folded_spec(fold(model)), folded_spec_from_onnx(onnx_path)
    assert back["layers"] == spec["layers"]
    residuals = [la for la in back["layers"] if la["op"] == "residual"]
    assert len(residuals) == SHORTCUTS
    assert [[inner["op"] for inner in la["layers"]][-1] for la in residuals].count("leaky_relu") == 1
    assert set(back["state_dict"]) == set(spec["state_dict"])
    assert all(torch.allclose(back["state_dict"][k], spec["state_dict"][k].float()) for k in spec["state_dict"])
    assert check_against_onnx(build_folded(back), onnx_path) < 1e-4


def test_a_shortcut_that_does_not_close_a_block_is_refused_in_one_line(onnx_path, tmp_path):
    """An Add of two activations is read as a shortcut around the layers between them only when it
    adds to the last layer's output; anything else is not our exporter's graph."""
    from onnx import helper

    from quicknet.serve.backends.base import BackendError

    graph = onnx.load(onnx_path)
    nodes = list(graph.graph.node)
    stem = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")  # then Min, Mul, Add: its PReLU
    activation, depthwise = nodes[stem + 3].output[0], nodes[stem + 4].output[0]
    assert nodes[stem + 4].op_type == nodes[stem + 5].op_type == "Conv"  # the first block's two
    # the stem's activation added to the depthwise output, after the pointwise: not a block's end
    odd = helper.make_node("Add", [activation, depthwise], ["odd_sum"], name="odd_add")
    graph.graph.node.insert(stem + 6, odd)
    onnx.save(graph, tmp_path / "odd.onnx")
    with pytest.raises(BackendError, match=r"^odd.onnx is not a folded QuickNet graph \(Add odd_add: .*shortcut"):
        folded_spec_from_onnx(tmp_path / "odd.onnx")


def test_orts_fast_prelu_form_and_int8_keep_the_shortcuts(onnx_path, tmp_path, cifar, test_images):
    """The CPU engine's rewrite (every PReLU, the shortcuts left as Adds) gives the same logits; the
    INT8 model quantizes the shortcuts' Adds too and keeps the FP32 model's top-1 on most images."""
    from quicknet import ort_graph
    from quicknet.build.compile import quantize_int8
    from quicknet.build.ortrun import onnx_logits

    rewritten = onnx.load(onnx_path)
    assert ort_graph.blocked_prelu(rewritten) == 8  # the 9 activations but the LeakyRelu
    onnx.save(rewritten, tmp_path / "rewritten.onnx")
    images = test_images.images[:256]
    fp32 = onnx_logits(onnx_path, images)
    assert np.abs(onnx_logits(tmp_path / "rewritten.onnx", images) - fp32).max() < 1e-4
    int8_path = quantize_int8(onnx_path, tmp_path / "model.int8.onnx", cifar.train.images[:256])
    int8 = onnx_logits(int8_path, images)
    assert (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.8
    graph = onnx.load(int8_path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert ops["Min"] == 0 and ops["Add"] == 8 + SHORTCUTS + 1  # PReLUs, shortcuts, the normalization
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    assert all(made_by.get(i) == "DequantizeLinear" for n in graph.node if n.op_type == "Add" for i in n.input)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_published_quicknet_res_serves_on_the_cpu_engines(model, onnx_path, tmp_path, test_images, backend):
    meta = {"labels": list("0123456789"), "artifacts": {"onnx": "model.onnx"}}
    mv = store.publish(tmp_path / "store", "quicknet-res", [onnx_path], meta)
    engine = load_backend(mv, Settings(backend=backend, precision="fp32", max_batch_size=16, threads=1))
    images = test_images.images[:16]
    with torch.no_grad():
        want = fold(model)(torch.from_numpy(images)).numpy()
    assert np.abs(engine.infer(images) - want).max() < 1e-4
    if backend == "onnxruntime":  # served through the rewrite, checked against the file at load
        assert engine.describe()["prelus_rewritten"] == 8
