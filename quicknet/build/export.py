"""Export the folded model to ONNX (dynamic batch) and prove it matches the PyTorch model."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from quicknet.build.data import MEAN, STD, Split
from quicknet.build.fold import FoldedResidual
from quicknet.build.model import INPUT_SIZE, QuickNet
from quicknet.build.ortrun import INPUT_NAME, OUTPUT_NAME, onnx_logits
from quicknet.build.progress import steps
from quicknet.errors import BuildError
from quicknet.fsutil import atomic_write

OPSET = 18
MAX_LOGIT_DELTA = 1e-3
MIN_TOP1_AGREEMENT = 0.999


@dataclass(frozen=True)
class Equivalence:
    images: int
    max_abs_logit_delta: float
    top1_agreement: float

    @property
    def ok(self) -> bool:
        return self.max_abs_logit_delta <= MAX_LOGIT_DELTA and self.top1_agreement >= MIN_TOP1_AGREEMENT


class _NoTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _exporter_noise_off():
    """What torch 2.13's exporter says on every export and a user can do nothing about: four lines
    that torchvision (never needed here) is not installed, and a FutureWarning about its own use of
    pytree's `LeafSpec`. Only those two are dropped; anything else it logs or warns about shows."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    quiet = _NoTorchvisionNotice()
    registration.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning)
            yield
    finally:
        registration.removeFilter(quiet)


def export_onnx(folded: torch.nn.Module, path: Path) -> Path:
    example = torch.zeros(2, INPUT_SIZE, INPUT_SIZE, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    buf = io.BytesIO()
    with contextlib.redirect_stdout(io.StringIO()), _exporter_noise_off():  # it narrates every pass
        program = torch.onnx.export(
            folded.eval(),
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(buf)
    model = elementwise_prelu(onnx.load_from_string(buf.getvalue()))
    model.doc_string = "QuickNet (reconstruction), folded: uint8 NHWC [N,32,32,3] -> float32 logits [N,10]"
    onnx.checker.check_model(model, full_check=True)
    with atomic_write(path) as f:
        f.write(model.SerializeToString())
    return path


def elementwise_prelu(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each per-channel `PRelu(x, s)` becomes `x + (s - 1) * Min(x, 0)`: the same function, as three
    elementwise ops that any ONNX runtime reads (and the torch engine's reader, `folded_onnx`). ONNX
    Runtime's PRelu kernel is not blocked (NCHWc), and this form ran quicknet-xs 1.75x faster than it
    on one image (1.4x at batch 8), logits within 1e-6. It still leaves ORT's blocked layout at every
    activation (ORT 1.32: a reorder out and back around the three ops, 30% of an image's time), so the
    CPU engine rewrites it once more at load into ops that stay blocked
    (`quicknet/ort_graph.py`); the published file keeps this portable form. (A PReLU
    whose slopes are all equal folds to LeakyRelu, which ORT fuses into the convolution, and is left
    alone.)"""
    from onnx import helper, numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        slope = initializers.get(node.input[1]) if node.op_type == "PRelu" else None
        if slope is None:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        minus_one = numpy_helper.from_array((numpy_helper.to_array(slope) - 1).astype(np.float32), f"{y}_slope_minus_1")
        zero = numpy_helper.from_array(np.zeros((), np.float32), f"{y}_zero")
        model.graph.initializer.extend([minus_one, zero])
        nodes += [
            helper.make_node("Min", [x, zero.name], [f"{y}_negative"], name=f"{node.name}_min"),
            helper.make_node("Mul", [f"{y}_negative", minus_one.name], [f"{y}_scaled"], name=f"{node.name}_mul"),
            helper.make_node("Add", [x, f"{y}_scaled"], [y], name=f"{node.name}_add"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for n in model.graph.node for name in n.input}
    kept = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


FOLDED_FORMAT = "quicknet-folded/1"


def folded_spec(folded: torch.nn.Module) -> dict:
    """The folded graph as plain data: layer kinds and shapes, normalization constants, weights.

    What the service's torch engine rebuilds the model from. Unlike a `torch.export` program, a
    state dict with a layer list loads under any torch version (`weights_only=True`, no code),
    so a GPU machine with another torch than the build's can serve it. A shortcut is
    `{"op": "residual", "layers": [...]}`, its layers' weights under `features.<i>.body.<j>`.
    """
    head = folded.classifier
    return {
        "format": FOLDED_FORMAT,
        "layers": _describe(folded.features),
        "classifier": {"in": head.in_features, "out": head.out_features},
        "state_dict": {k: v.detach().clone() for k, v in folded.state_dict().items()},
    }


def _describe(layers: torch.nn.Sequential) -> list[dict]:
    out: list[dict] = []
    for layer in layers:
        if isinstance(layer, torch.nn.Conv2d):
            k, p = layer.kernel_size[0], layer.padding[0]
            out.append(
                {"op": "conv", "in": layer.in_channels, "out": layer.out_channels, "kernel": k, "padding": p}
                | {"groups": layer.groups, "bias": layer.bias is not None}
            )
        elif isinstance(layer, torch.nn.PReLU):
            out.append({"op": "prelu", "channels": layer.num_parameters})
        elif isinstance(layer, torch.nn.LeakyReLU):
            out.append({"op": "leaky_relu", "slope": layer.negative_slope})
        elif isinstance(layer, torch.nn.MaxPool2d):
            out.append({"op": "maxpool", "kernel": layer.kernel_size})
        elif isinstance(layer, FoldedResidual):
            out.append({"op": "residual", "layers": _describe(layer.body)})
        else:
            raise BuildError(f"cannot describe folded layer {type(layer).__name__}")
    return out


def export_folded_weights(folded: torch.nn.Module, path: Path) -> Path:
    with atomic_write(path) as f:
        torch.save(folded_spec(folded.eval()), f)
    return path


def reference_logits(model: QuickNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The eval-mode, unfolded PyTorch model on the same pixels, normalized outside the graph.
    Channels-last batches of 64: on 2 cores that scores quicknet-xs at ~1,000 img/s against ~380 in
    NCHW batches of 500 (the full model ~80 against ~66), with the same logits."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)  # the caller's stays as it is
    out = []
    starts = range(0, len(images), batch_size)
    with torch.inference_mode():
        for i in steps(starts, len(starts), "pytorch reference"):
            x = torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float()
            out.append(model(((x - mean) / std).contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def verify(model: QuickNet, onnx_path: Path, split: Split) -> Equivalence:
    ref = reference_logits(model, split.images)
    got = onnx_logits(onnx_path, split.images)
    eq = Equivalence(
        images=len(ref),
        max_abs_logit_delta=float(np.abs(ref - got).max()),
        top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean()),
    )
    if not eq.ok:
        raise BuildError(
            f"ONNX model disagrees with PyTorch: max |Δlogit| {eq.max_abs_logit_delta:.2e} "
            f"(limit {MAX_LOGIT_DELTA}), top-1 agreement {eq.top1_agreement:.4f} (floor {MIN_TOP1_AGREEMENT})"
        )
    return eq
