from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from quicknet.build.export import export_onnx, reference_logits, verify
from quicknet.build.fold import fold, graph_nodes
from quicknet.build.model import build_model
from quicknet.build.ortrun import onnx_logits
from quicknet.errors import BuildError
from tests.trained import trained_looking


@pytest.fixture(scope="module")
def trained_like_model() -> nn.Module:
    """A model with non-trivial BN statistics and per-channel PReLU slopes, as training leaves them."""
    torch.manual_seed(0)
    return trained_looking(build_model("quicknet-xs"), bn_mean=0.5, slopes=(0.0, 0.5))


@pytest.fixture(scope="module")
def onnx_path(trained_like_model, tmp_path_factory):
    return export_onnx(fold(trained_like_model), tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_fold_removes_batchnorm_and_dropout(trained_like_model):
    folded = fold(trained_like_model)
    kinds = {type(m) for m in folded.modules()}
    assert nn.BatchNorm2d not in kinds and nn.Dropout not in kinds
    assert graph_nodes(folded) < graph_nodes(trained_like_model) + 4  # +4: normalization now lives in the graph


@pytest.mark.parametrize("source", ["random", "real"])
def test_folded_model_matches_eval_model(trained_like_model, test_images, source):
    if source == "random":
        images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    else:
        images = test_images.images[:256]
    ref = reference_logits(trained_like_model, images)
    with torch.no_grad():
        got = fold(trained_like_model)(torch.from_numpy(images)).numpy()
    assert np.abs(ref - got).max() < 1e-4


def test_onnx_takes_uint8_nhwc_with_dynamic_batch(onnx_path):
    model = onnx.load(onnx_path)
    (inp,) = model.graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert model.graph.node[0].op_type == "Cast"  # TensorRT accepts uint8 only straight into a Cast
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)


def test_per_channel_prelu_is_exported_as_elementwise_ops(onnx_path):
    """ONNX Runtime's PRelu forces a layout change around every activation on CPUs (2/3 of the
    time of quicknet-xs); the export uses x + (s - 1) * min(x, 0) instead, a portable form the CPU
    engine rewrites further at load (tests/test_ort_graph.py)."""
    ops = [n.op_type for n in onnx.load(onnx_path).graph.node]
    assert "PRelu" not in ops
    assert ops.count("Min") == 9 and ops.count("Conv") == 17  # one activation per block (stem + 8)


@pytest.mark.parametrize("batch", [1, 7, 300])
def test_onnx_matches_pytorch_on_real_images(trained_like_model, onnx_path, test_images, batch):
    images = test_images.images[:batch]
    ref = reference_logits(trained_like_model, images)
    got = onnx_logits(onnx_path, images)
    assert got.shape == (batch, 10)
    assert np.abs(ref - got).max() <= 1e-3
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.999


def test_verify_passes_and_catches_a_wrong_model(trained_like_model, onnx_path, test_images):
    eq = verify(trained_like_model, onnx_path, test_images)
    assert eq.ok and eq.images == len(test_images.labels)
    other = build_model("quicknet-xs").eval()
    with pytest.raises(BuildError, match="disagrees with PyTorch"):
        verify(other, onnx_path, test_images)


def test_equal_prelu_slopes_fold_to_leaky_relu():
    folded = fold(build_model("quicknet-xs").eval())  # fresh: every slope is PReLU's init, 0.25
    acts = [m for m in folded.features if not isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    assert acts and all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.25 for m in acts)


def test_export_says_nothing_a_user_cannot_act_on(tmp_path):
    """torch 2.13's exporter logs four lines on every export that torchvision is not installed, and
    warns about its own use of pytree's LeafSpec: a new user's build log had them. torch's loggers
    write through their own handler (`torch.onnx` does not propagate): a handler of the test's
    own on that logger sees what a user's terminal would."""
    import logging
    import warnings

    from quicknet.build import export

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("torch.onnx")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(fold(build_model("quicknet-xs").eval()), tmp_path / "model.onnx")
            with export._exporter_noise_off():  # anything else the exporter says still shows
                logging.getLogger("torch.onnx._internal.exporter._registration").warning("something else")
                warnings.warn("another future change", FutureWarning, stacklevel=1)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in seen if "torchvision" in m] and "something else" in seen, seen
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another future change"]


def test_evaluation_in_small_channels_last_batches_gives_the_same_logits(trained_like_model, onnx_path, test_images):
    """Evaluation runs in batches of 64, the PyTorch reference channels-last, because that is ~1.4x
    (ONNX Runtime) and ~2.7x (PyTorch) faster on 2 cores: the scores must not move for it, and the
    caller's model keeps its own layout."""
    from quicknet.build.data import MEAN, STD

    images = test_images.images[:300]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():  # the plain way: NCHW, one batch
        plain = trained_like_model((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert np.abs(reference_logits(trained_like_model, images) - plain.numpy()).max() < 1e-4
    assert all(p.is_contiguous() for p in trained_like_model.parameters()), "the caller's model was changed"
    assert np.abs(onnx_logits(onnx_path, images) - onnx_logits(onnx_path, images, batch_size=500)).max() < 1e-4
