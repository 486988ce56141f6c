"""The FP32 graph ONNX Runtime serves on the CPU: a version's `model.onnx`, its PReLUs rewritten at
load into operators that ORT's blocked (NCHWc) convolution kernels run without leaving their layout.

Why: ORT's CPU engine reorders every convolution's output into 8- or 16-channel blocks, and its
elementwise kernels with a per-channel constant (Min, Mul and Add: the exporter's PReLU, see
`quicknet.build.export.elementwise_prelu`) do not run on blocks, so each of QuickNet's nine
activations costs a reorder out, three passes over the tensor and a reorder back: 30% of one
image's time for the full model (profiled: 1.44 of 4.89 ms). ORT's blocked layout does keep
`BatchNormalization` (as a 1x1 per-channel convolution), `Relu` (fused into the convolution before
it) and `Add` (fused into the convolution before it as its sum input). So, per channel with slope s:

    PReLU(x) = s·x + Relu((1 - s)·x)                 where s <= 1 in every channel of the layer
             = s·x + (1 - s)·Relu(x)                 otherwise (one more pass)

two blocked passes instead of five, logits within ~1e-6 (float rounding). Measured on the project's
CPU (2 cores, 2 spinning threads, engine alone): the full quicknet 4.82 -> 3.96 ms for one image,
4.77 -> 3.81 ms an image at batch 8; quicknet-xs 0.82 -> 0.57 and 0.62 -> 0.39 at batch 16
(`python -m benchmarks.engine`). The form a depthwise convolution's weights could absorb (two
depthwise convolutions instead of the scaling) measured slower: ORT's depthwise 3x3 costs more
than the 1x1 scalings.

It is ORT-specific, so it happens here, at load, and the published file stays the portable graph
that TensorRT, the torch engine and any other runtime read. It is exact algebra, yet the rewritten
session is still checked against the source file's logits before it serves
(`derived.check_logits`); a graph of any other shape is served as it is.
"""

from __future__ import annotations

import numpy as np

REWRITE = "blocked-prelu/1"


def blocked_prelu(model) -> int:
    """Rewrite `model` (an `onnx.ModelProto`) in place; returns how many PReLUs were rewritten.

    Matches the exporter's form only: `Min(x, 0)`, `Mul(that, s - 1)` with a constant per-channel
    `(1, C, 1, 1)` slope, `Add(x, that)`, where the Min and the Mul feed nothing else."""
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for name in [i for node in graph.node for i in node.input] + [o.name for o in graph.output]:
        consumers[name] = consumers.get(name, 0) + 1

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(constants[name]) if name in constants else None

    def per_channel(name: str, channels: int, values: np.ndarray, tag: str):
        tensor = numpy_helper.from_array(values.astype(np.float32).reshape(channels), f"{name}_{tag}")
        graph.initializer.append(tensor)
        return tensor.name

    def scaling(name: str, x: str, y: str, scale: np.ndarray) -> object:
        """`y = scale·x` per channel, as a BatchNormalization (mean 0, variance 1, epsilon 0)."""
        c = scale.size
        inputs = [
            per_channel(name, c, scale, "scale"),
            per_channel(name, c, np.zeros(c), "bias"),
            per_channel(name, c, np.zeros(c), "mean"),
            per_channel(name, c, np.ones(c), "var"),
        ]
        return helper.make_node("BatchNormalization", [x, *inputs], [y], name=name, epsilon=0.0)

    nodes = list(graph.node)
    out, rewritten, dropped, i = [], 0, set(), 0
    while i < len(nodes):
        found = _match(nodes, i, constant, consumers)
        if found is None:
            out.append(nodes[i])
            i += 1
            continue
        x, y, slope_minus_1, used = found
        s = slope_minus_1.reshape(-1).astype(np.float64) + 1.0
        base = f"{y}_blocked"
        if bool(np.all(s <= 1.0)):
            out += [
                scaling(f"{base}_negative", x, f"{base}_n0", 1.0 - s),
                helper.make_node("Relu", [f"{base}_n0"], [f"{base}_n"], name=f"{base}_relu"),
            ]
        else:
            out += [
                helper.make_node("Relu", [x], [f"{base}_r"], name=f"{base}_relu"),
                scaling(f"{base}_negative", f"{base}_r", f"{base}_n", 1.0 - s),
            ]
        out += [
            scaling(f"{base}_linear", x, f"{base}_l", s),
            helper.make_node("Add", [f"{base}_l", f"{base}_n"], [y], name=f"{base}_add"),
        ]
        dropped |= used
        rewritten += 1
        i += 3
    if rewritten:
        del graph.node[:]
        graph.node.extend(out)
        still_used = {name for node in graph.node for name in node.input}
        kept = [t for t in graph.initializer if t.name in still_used or t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return rewritten


def _match(nodes: list, i: int, constant, consumers: dict[str, int]):
    """`(x, y, slope - 1, constants used)` where `nodes[i:i+3]` are one exporter PReLU, else None."""
    if i + 2 >= len(nodes):
        return None
    low, mul, add = nodes[i : i + 3]
    if (low.op_type, mul.op_type, add.op_type) != ("Min", "Mul", "Add") or len(low.input) != 2:
        return None
    x, zero_name = low.input
    zero = constant(zero_name)
    if zero is None or zero.size != 1 or float(zero.reshape(-1)[0]) != 0.0:
        return None
    if list(mul.input)[:1] != [low.output[0]] or len(mul.input) != 2:
        return None
    slope = constant(mul.input[1])
    if slope is None or slope.ndim != 4 or slope.shape[0] != 1 or slope.shape[2:] != (1, 1):
        return None
    if sorted(add.input) != sorted([x, mul.output[0]]):
        return None
    if consumers.get(low.output[0]) != 1 or consumers.get(mul.output[0]) != 1:
        return None
    return x, add.output[0], slope, {zero_name, mul.input[1]}
