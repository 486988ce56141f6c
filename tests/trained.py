"""Weights that look trained, for the tests that compare a model with its folded, exported or fused
form. A fresh model's BN statistics are 0 and 1 and its PReLU slopes all 0.25 (one LeakyReLU once
folded), so its logits are near-constant, and a comparison of them passes on almost anything."""

from __future__ import annotations

from torch import nn


def trained_looking(
    model: nn.Module,
    *,
    bn_mean: float = 0.3,
    bn_weight: tuple[float, float] = (0.5, 1.5),
    slopes: tuple[float, float] = (0.05, 0.4),
    classifier_std: float | None = None,
) -> nn.Module:
    """`model` in eval mode with random BN statistics and affine terms, per-channel slopes and, with
    `classifier_std`, a classifier that spreads the logits; drawn from torch's global generator (the
    caller seeds it)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-bn_mean, bn_mean)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(*bn_weight)
            m.bias.data.uniform_(-0.3, 0.3)
        elif isinstance(m, nn.PReLU):
            m.weight.data.uniform_(*slopes)
    if classifier_std is not None:
        model.classifier.weight.data.normal_(0, classifier_std)
    return model.eval()
