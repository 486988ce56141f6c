"""QuickNet (Ghosh, 2017, arXiv:1701.02291) — a reconstruction.

The paper states the ingredients but gives no layer table: the reference Darknet model made
faster with depthwise-separable convolutions and per-channel PReLU, batch norm, dropout 0.5,
3.56 M parameters. This module rebuilds it from Darknet's CIFAR topology (3x3 stages with 2x2
max-pooling, a 1x1 convolution to the classes, global average pooling), made separable and
twice as wide. It is *not* the author's code; its numbers are ours.

    stem  conv3x3 3->256, BN, PReLU
    sep   (depthwise 3x3 -> pointwise 1x1 -> BN -> PReLU)  2x256 | pool | 3x512 | pool | 3x1024
    head  dropout 0.5, conv1x1 -> 10, global average pool

`quicknet` has ~3.48 M parameters and ~0.49 G multiply-adds per 32x32 image; `quicknet-s` and
`quicknet-xs` scale every width by 0.5 and 0.25 for CPUs.

`quicknet-res` departs from the paper: the same layers with an identity shortcut around every
separable block whose input and output widths agree (6 of the 8; `y = x + block(x)`), as Xception
does around its separable modules and airbench96 around its last two convolutions a stage. Same
parameters and multiply-adds (the shortcuts are additions). Folded, each shortcut stays one
(`fold.FoldedResidual`, an `Add` in ONNX).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from quicknet.errors import BuildError

NUM_CLASSES = 10
INPUT_SIZE = 32


@dataclass(frozen=True)
class ArchConfig:
    name: str
    stem: int
    stages: tuple[tuple[int, ...], ...]
    dropout: float = 0.5
    num_classes: int = NUM_CLASSES
    prelu_init: float = 0.25
    residual: bool = False  # identity shortcut around each separable block that keeps its width

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ArchConfig:
        return cls(**{**d, "stages": tuple(tuple(s) for s in d["stages"])})


def _scaled(name: str, width: float, residual: bool = False) -> ArchConfig:
    def w(c: int) -> int:
        return int(c * width)

    return ArchConfig(
        name=name,
        stem=w(256),
        stages=((w(256),) * 2, (w(512),) * 3, (w(1024),) * 3),
        residual=residual,
    )


VARIANTS: dict[str, ArchConfig] = {
    "quicknet": _scaled("quicknet", 1.0),
    "quicknet-s": _scaled("quicknet-s", 0.5),
    "quicknet-xs": _scaled("quicknet-xs", 0.25),
    "quicknet-res": _scaled("quicknet-res", 1.0, residual=True),
}


def get_config(name: str) -> ArchConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise BuildError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}") from None


class ConvBNPReLU(nn.Module):
    """Standard 3x3 convolution (the stem)."""

    def __init__(self, cin: int, cout: int, prelu_init: float):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout, init=prelu_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class SeparableBlock(nn.Module):
    """Depthwise 3x3 then pointwise 1x1, one BN and PReLU after the pair (as in Xception)."""

    def __init__(self, cin: int, cout: int, prelu_init: float):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout, init=prelu_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.pointwise(self.depthwise(x))))


class ResidualSeparableBlock(nn.Module):
    """`x + block(x)` around a separable block of equal widths (quicknet-res). Not a subclass of
    SeparableBlock, so that code handling separable blocks fails on it instead of dropping the `x`."""

    def __init__(self, channels: int, prelu_init: float):
        super().__init__()
        self.block = SeparableBlock(channels, channels, prelu_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class QuickNet(nn.Module):
    """Takes float NCHW images already normalized; `fold.py` builds the uint8 serving graph."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [ConvBNPReLU(3, cfg.stem, cfg.prelu_init)]
        cin = cfg.stem
        for i, stage in enumerate(cfg.stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for cout in stage:
                if cfg.residual and cin == cout:
                    layers.append(ResidualSeparableBlock(cout, cfg.prelu_init))
                else:
                    layers.append(SeparableBlock(cin, cout, cfg.prelu_init))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Conv2d(cin, cfg.num_classes, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m is not self.classifier:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu", a=self.cfg.prelu_init)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.classifier(self.dropout(self.features(x)))
        return x.mean(dim=(2, 3))


def build_model(name: str) -> QuickNet:
    return QuickNet(get_config(name))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(cfg: ArchConfig, size: int = INPUT_SIZE) -> int:
    """Multiply-adds of convolutions per image (pooling, BN and activations are not counted)."""
    hw = size * size
    macs = 3 * 9 * cfg.stem * hw
    cin = cfg.stem
    for i, stage in enumerate(cfg.stages):
        if i > 0:
            hw //= 4
        for cout in stage:
            macs += cin * 9 * hw + cin * cout * hw
            cin = cout
    return macs + cin * cfg.num_classes * hw
