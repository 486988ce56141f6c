from __future__ import annotations

import pytest
import torch

from quicknet.errors import BuildError
from quicknet.model import VARIANTS, build_model, count_macs, count_params, get_config


def test_quicknet_matches_the_papers_size():
    model = build_model("quicknet")
    # the paper reports 3.56 M; the reconstruction lands at ~3.48 M
    assert 3.4e6 < count_params(model) < 3.6e6
    assert 0.45e9 < count_macs(get_config("quicknet")) < 0.52e9


def test_width_variants_shrink_roughly_quadratically():
    full, s, xs = (count_params(build_model(n)) for n in VARIANTS)
    assert 3.5 < full / s < 4.5 and 3.5 < s / xs < 4.5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shape(name):
    out = build_model(name).eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_unknown_model_is_a_clear_error():
    with pytest.raises(BuildError, match="unknown model 'resnet'"):
        get_config("resnet")
