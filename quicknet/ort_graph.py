"""QuickNet's PReLUs in the form ONNX Runtime's CPU kernels run fastest, FP32 and INT8.

ORT's CPU engine reorders every convolution's output into 8- or 16-channel blocks (NCHWc), and its
elementwise kernels with a per-channel constant (Min, Mul and Add: the exporter's PReLU, see
`quicknet.build.export.elementwise_prelu`) do not run on blocks, so each of QuickNet's nine
activations costs a reorder out, three passes over the tensor and a reorder back: 30% of one
image's time for the full model (profiled: 1.44 of 4.89 ms). A per-channel scaling is a 1x1
depthwise convolution, which ORT keeps blocked, with a `Relu` after it fused in, and an `Add` after
it fused in as the convolution's sum input. So, per channel with slope s:

    PReLU(x) = s·x + Relu((1 - s)·x)                 where s <= 1 in every channel of the layer
             = s·x + (1 - s)·Relu(x)                 otherwise (one more pass)

two blocked passes instead of five, logits within ~1e-6 (float rounding). Two uses:

- **FP32, at load** (`quicknet/serve/backends/onnxruntime.py`): the engine serves `model.onnx`
  rewritten, checked against the file's logits first. The full quicknet 4.82 -> 3.96 ms for one
  image, 4.77 -> 3.81 ms an image at batch 8; quicknet-xs 0.82 -> 0.57 and 0.62 -> 0.39 at batch 16
  (2 cores, engine alone: `python -m benchmarks.engine`).
- **INT8, at compile** (`quicknet/build/compile.py`): the quantizer reads the rewritten graph, so
  each activation becomes two int8 depthwise convolutions (the Relu folded into one's output
  range) and an int8 Add, instead of a dequantize, a float Min, a quantize, an int8 Mul and an int8
  Add. The full quicknet's INT8 model 3.16 -> 2.31 ms for one image, 2.86 -> 1.75 ms an image at
  batch 8, at 91.18% against 91.13% (the 10k split; calibration as published).

The form a depthwise 3x3 convolution's weights could absorb (two of them instead of the scalings)
measured slower: ORT's depthwise 3x3 costs more than the 1x1 scalings. The published `model.onnx`
keeps the portable form that TensorRT, the torch engine and any other runtime read: the rewrite is
for ORT. A graph of any other shape is left as it is.
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

    def scaling(name: str, x: str, y: str, scale: np.ndarray) -> object:
        """`y = scale·x` per channel: a 1x1 depthwise convolution."""
        weights = numpy_helper.from_array(scale.astype(np.float32).reshape(-1, 1, 1, 1), f"{name}_weight")
        graph.initializer.append(weights)
        return helper.make_node("Conv", [x, weights.name], [y], name=name, group=scale.size, kernel_shape=[1, 1])

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
                scaling(f"{base}_rectified", x, f"{base}_r0", 1.0 - s),
                helper.make_node("Relu", [f"{base}_r0"], [f"{base}_r"], name=f"{base}_relu"),
            ]
        else:
            out += [
                helper.make_node("Relu", [x], [f"{base}_r0"], name=f"{base}_relu"),
                scaling(f"{base}_rectified", f"{base}_r0", f"{base}_r", 1.0 - s),
            ]
        out += [
            scaling(f"{base}_linear", x, f"{base}_l", s),
            helper.make_node("Add", [f"{base}_l", f"{base}_r"], [y], name=f"{base}_add"),
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


def rewrite_file(source, target) -> int:
    """`source` (an ONNX file) rewritten into `target`; returns how many PReLUs were rewritten."""
    import onnx

    model = onnx.load(source)
    rewritten = blocked_prelu(model)
    onnx.save(model, target)
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
