"""The torch engine's model, read back from the published `model.onnx`.

A version stores its FP32 weights once, in `model.onnx` (hashed and gated); the torch engine's
layer list and state dict are derived from that graph at load instead of travelling as a second
copy of the weights (14 MB for the full quicknet). The folded graph has one known shape:

    Cast → Mul(normalize.scale) → Add(normalize.shift) → Transpose
    (Conv | PReLU as `x + (s-1)·Min(x, 0)` or `PRelu` | LeakyRelu | MaxPool | Add(x, y))*
    ReduceMean → Gemm(classifier)

where `Add(x, y)` of two activations is a shortcut (quicknet-res): `x` an earlier layer's output,
`y` the last one's, read back as `{"op": "residual", "layers": [what lies between]}`.

Anything else is refused with one line: this reads our exporter's graphs, not ONNX in general.
The result is `build_folded`'s input, and the caller checks its logits against ONNX Runtime on
the same file before it serves (`check_against_onnx`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quicknet.serve.backends.base import BackendError
from quicknet.serve.backends.derived import check_logits, probe_images, source_logits

FOLDED_FORMAT = "quicknet-folded/1"
# Nodes that carry no weights of their own: the uint8 cast and layout change, the PReLU form's
# Min and Add (its slopes sit on the Mul), the global average pool.
_STRUCTURAL = {"Cast", "Transpose", "Min", "Add", "ReduceMean", "GlobalAveragePool", "Flatten"}


def folded_spec_from_onnx(path: Path) -> dict:
    """`{"format", "layers", "classifier", "state_dict"}` (torch tensors) from a folded QuickNet graph."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's decode errors have no common base worth naming
        raise BackendError(f"cannot read {path.name} as ONNX ({e}); republish the model") from None
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    # One entry a layer: (its spec, its weights by suffix), or ({"op": "residual"}, the entries it
    # holds) for a shortcut; keys ("features.<i>[.body.<j>].<suffix>") are given once the nesting is
    # known (`body`: fold.FoldedResidual's and build_folded's attribute).
    entries: list[tuple] = []
    state: dict[str, np.ndarray] = {}
    position: dict[str, int] = {}  # an activation -> len(entries) once it was made: `Add(x, y)` spans entries[x:y]
    prelu_scaled: set[str] = set()  # the PReLU form's `(s-1)·Min(x, 0)`, which its own Add takes

    def attr(node, name: str, default=None):
        found = next((a for a in node.attribute if a.name == name), None)
        return default if found is None else helper.get_attribute_value(found)

    def bad(node, why: str) -> BackendError:
        return BackendError(f"{path.name} is not a folded QuickNet graph ({node.op_type} {node.name}: {why})")

    for node in model.graph.node:
        op = node.op_type
        if op == "Mul" and node.input[1] == "normalize.scale":
            state["normalize.scale"] = weights["normalize.scale"]
        elif op == "Add" and node.input[1] == "normalize.shift":
            state["normalize.shift"] = weights["normalize.shift"]
        elif op == "Conv":
            w = weights.get(node.input[1])
            if w is None or w.ndim != 4 or w.shape[2] != w.shape[3]:
                raise bad(node, "weights are not a square constant kernel")
            if list(attr(node, "strides", [1, 1])) != [1, 1] or list(attr(node, "dilations", [1, 1])) != [1, 1]:
                raise bad(node, "strides or dilations other than 1")
            pads = list(attr(node, "pads", [0, 0, 0, 0]))
            if len(set(pads)) != 1:
                raise bad(node, f"uneven padding {pads}")
            groups = int(attr(node, "group", 1))
            bias = len(node.input) > 2 and bool(node.input[2])
            layer = {"op": "conv", "in": w.shape[1] * groups, "out": w.shape[0], "kernel": w.shape[2]}
            layer |= {"padding": pads[0], "groups": groups, "bias": bias}
            entries.append((layer, {"weight": w} | ({"bias": weights[node.input[2]]} if bias else {})))
        elif op == "Mul" and node.input[1].endswith("_slope_minus_1"):  # export.elementwise_prelu's form
            slopes = weights[node.input[1]].reshape(-1) + 1
            entries.append(({"op": "prelu", "channels": len(slopes)}, {"weight": slopes}))
            prelu_scaled.add(node.output[0])
        elif op == "PRelu" and node.input[1] in weights:  # versions exported before that rewrite
            slopes = weights[node.input[1]].reshape(-1)
            entries.append(({"op": "prelu", "channels": len(slopes)}, {"weight": slopes}))
        elif op == "LeakyRelu":
            entries.append(({"op": "leaky_relu", "slope": float(attr(node, "alpha", 0.01))}, {}))
        elif op == "MaxPool":
            kernel = list(attr(node, "kernel_shape"))
            if kernel != list(attr(node, "strides", kernel)) or len(set(kernel)) != 1:
                raise bad(node, "only square pools with stride = kernel")
            entries.append(({"op": "maxpool", "kernel": kernel[0]}, {}))
        elif op == "Add" and all(i in position for i in node.input) and not prelu_scaled & set(node.input):
            # two activations added: a shortcut (quicknet-res) from the earlier one around what followed it
            start, end = sorted(position[i] for i in node.input)
            if end != len(entries) or start == end:
                raise bad(node, "a shortcut must add a block's input to its last layer's output")
            entries[start:] = [({"op": "residual"}, entries[start:])]
            position = {name: at for name, at in position.items() if at <= start}  # what was inside is gone
        elif op == "Gemm":
            w, b = weights.get(node.input[1]), weights.get(node.input[2]) if len(node.input) > 2 else None
            if w is None or b is None or attr(node, "transB", 0) != 1:
                raise bad(node, "the classifier must be constant weights (transB) and bias")
            state["classifier.weight"], state["classifier.bias"] = w, b
        elif op not in _STRUCTURAL:
            raise bad(node, "unexpected operator")
        position |= dict.fromkeys(node.output, len(entries))

    def nest(entries: list[tuple], prefix: str) -> list[dict]:
        layers = []
        for i, (layer, inner) in enumerate(entries):
            if layer["op"] == "residual":
                layers.append({"op": "residual", "layers": nest(inner, f"{prefix}.{i}.body")})
                continue
            layers.append(layer)
            state.update({f"{prefix}.{i}.{suffix}": array for suffix, array in inner.items()})
        return layers

    layers = nest(entries, "features")
    if "classifier.weight" not in state or "normalize.scale" not in state or "normalize.shift" not in state:
        raise BackendError(f"{path.name} is not a folded QuickNet graph (no normalization or classifier)")
    head = state["classifier.weight"].shape
    return {
        "format": FOLDED_FORMAT,
        "layers": layers,
        "classifier": {"in": head[1], "out": head[0]},
        "state_dict": {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()},
    }


def check_against_onnx(module, path: Path, threads: int = 1) -> float:
    """The derived module's FP32 logits against ONNX Runtime's on the same file
    (`derived.check_logits`); returns the largest difference, or refuses with one line."""
    import torch

    images = probe_images()
    expected = source_logits(path, images, threads)
    with torch.inference_mode():
        got = module(torch.from_numpy(images)).float().numpy()
    return check_logits(got, expected, f"the torch model derived from {path.name}")
