from __future__ import annotations

import pytest
import torch

from quicknet.build.model import VARIANTS, build_model, count_macs, count_params, get_config
from quicknet.errors import BuildError


def test_quicknet_matches_the_papers_size():
    model = build_model("quicknet")
    # the paper reports 3.56 M; the reconstruction lands at ~3.48 M
    assert 3.4e6 < count_params(model) < 3.6e6
    assert 0.45e9 < count_macs(get_config("quicknet")) < 0.52e9


def test_width_variants_shrink_roughly_quadratically():
    full, s, xs = (count_params(build_model(n)) for n in ("quicknet", "quicknet-s", "quicknet-xs"))
    assert 3.5 < full / s < 4.5 and 3.5 < s / xs < 4.5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shape(name):
    out = build_model(name).eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_quicknet_res_adds_identity_shortcuts_and_nothing_else():
    from quicknet.build.fold import FoldedResidual, fold
    from quicknet.build.model import ArchConfig, ResidualSeparableBlock

    plain, res = build_model("quicknet"), build_model("quicknet-res")
    assert count_params(res) == count_params(plain) and count_macs(res.cfg) == count_macs(plain.cfg)
    shortcuts = [m for m in res.features if isinstance(m, ResidualSeparableBlock)]
    assert len(shortcuts) == 6, "every separable block that keeps its width: 2 + 2 + 2"
    x = torch.randn(1, 256, 8, 8)
    assert torch.allclose(shortcuts[0].eval()(x), x + shortcuts[0].block(x))
    folded = [m for m in fold(res).features if isinstance(m, FoldedResidual)]  # never folded without them
    assert len(folded) == 6  # what they compute folded: tests/test_residual.py
    old = {k: v for k, v in plain.cfg.to_dict().items() if k != "residual"}  # checkpoints from before the field
    assert ArchConfig.from_dict(old) == plain.cfg


def test_unknown_model_is_a_clear_error():
    with pytest.raises(BuildError, match="unknown model 'resnet'"):
        get_config("resnet")
