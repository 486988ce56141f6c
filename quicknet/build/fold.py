"""Fold a trained QuickNet into its inference graph.

- Batch norm folds into the convolution before it (scale the filters, add a bias).
- PReLU keeps its per-channel slopes as constants: at test time it is a leaky ReLU with a fixed
  slope per channel (ONNX `PRelu` with an initializer, TensorRT's parametric-ReLU layer).
- Dropout disappears; the 1x1 classifier moves after global average pooling (both are linear, so
  the order is free, and pooling first costs 64x fewer multiply-adds).
- A shortcut (quicknet-res) stays a shortcut: `FoldedResidual`, `x + body(x)` around the block's
  folded layers, an `Add` in ONNX.
- Input normalization moves into the graph: the folded model takes uint8 NHWC [N,32,32,3] and
  returns float32 logits [N,10]. It stays one affine op before the stem rather than being folded
  into the stem's filters, because the stem pads with zeros in *normalized* space and folding
  would change the border pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from quicknet.build.data import MEAN, STD
from quicknet.build.model import ConvBNPReLU, QuickNet, ResidualSeparableBlock, SeparableBlock


def _fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, groups=conv.groups, bias=True
    )
    fused.weight.data.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    fused.bias.data.copy_(bias)
    return fused


def _inference_prelu(act: nn.PReLU) -> nn.Module:
    slopes = act.weight.detach()
    if torch.all(slopes == slopes[0]):
        return nn.LeakyReLU(float(slopes[0]))
    prelu = nn.PReLU(slopes.numel())
    prelu.weight.data.copy_(slopes)
    return prelu


class InputNormalize(nn.Module):
    """uint8 NHWC → float NCHW, (x - mean) / std as one multiply-add.

    The cast comes first: TensorRT accepts uint8 only as a graph input feeding a Cast.
    """

    def __init__(self, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD):
        super().__init__()
        scale = 1.0 / torch.tensor(std)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", -torch.tensor(mean) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.scale + self.shift).permute(0, 3, 1, 2)


class FoldedResidual(nn.Module):
    """`x + body(x)`: a shortcut around folded layers that keep the width (quicknet-res). `body` names
    its weights `features.<i>.body.<j>`, the keys every reader of a folded spec expects."""

    def __init__(self, body: nn.Sequential):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FoldedQuickNet(nn.Module):
    def __init__(self, normalize: InputNormalize, features: nn.Sequential, classifier: nn.Linear):
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(images))
        return self.classifier(x.mean(dim=(2, 3)))


def _fold_layer(layer: nn.Module) -> list[nn.Module]:
    if isinstance(layer, ConvBNPReLU):
        return [_fold_bn(layer.conv, layer.bn), _inference_prelu(layer.act)]
    if isinstance(layer, SeparableBlock):
        return [layer.depthwise, _fold_bn(layer.pointwise, layer.bn), _inference_prelu(layer.act)]
    if isinstance(layer, ResidualSeparableBlock):
        return [FoldedResidual(nn.Sequential(*_fold_layer(layer.block)))]
    if isinstance(layer, nn.MaxPool2d):
        return [layer]
    raise TypeError(f"fold does not know {type(layer).__name__}")


@torch.no_grad()
def fold(model: QuickNet) -> FoldedQuickNet:
    model = model.eval()
    layers = [folded for layer in model.features for folded in _fold_layer(layer)]
    head = model.classifier
    linear = nn.Linear(head.in_channels, head.out_channels)
    linear.weight.data.copy_(head.weight.view(head.out_channels, head.in_channels))
    linear.bias.data.copy_(head.bias)
    folded = FoldedQuickNet(InputNormalize(), nn.Sequential(*layers), linear)
    return folded.eval()


def graph_nodes(module: nn.Module) -> int:
    """Operations in the traced graph (placeholders and outputs excluded)."""
    graph = torch.fx.symbolic_trace(module).graph
    return sum(1 for n in graph.nodes if n.op not in ("placeholder", "output"))
