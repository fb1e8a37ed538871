"""Named surgeries that are not specific to one table: TF 'same' padding on strided convs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import converter
from helpers import keras_build_args, make_keras_fixture, rel_err, torch_logits
from converter.errors import MappingError
from converter.model import apply_bn_config, build_target
from converter.surgeries import SURGERIES, tf_same_pads


PADS = [(32, 3, 2, (0, 1)), (33, 3, 2, (1, 1)), (32, 5, 2, (1, 2)), (7, 7, 2, (3, 3)),
        (8, 3, 1, (1, 1)), (1, 3, 2, (1, 1))]


@pytest.mark.parametrize("size,kernel,stride,pads", PADS)
def test_tf_same_pads(size, kernel, stride, pads):
    assert tf_same_pads(size, kernel, stride) == pads
    out = -(-size // stride)  # TF 'same': ceil(size / stride) outputs
    assert (size + sum(pads) - kernel) // stride + 1 == out


def test_tf_same_padding_replaces_only_strided_convs_and_matches_explicit_pad():
    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1),
                          nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Conv2d(8, 4, 1, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    SURGERIES.get("tf_same_padding")(model)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Conv2dTFSame", "Conv2d", "Conv2dTFSame", "Conv2d"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 16, 16)
    w = before
    y = F.conv2d(F.pad(x, (0, 1, 0, 1)), w["0.weight"], w["0.bias"], 2)
    y = F.conv2d(y, w["1.weight"], w["1.bias"], 1, 1)
    y = F.conv2d(F.pad(y, (0, 1, 0, 1)), w["2.weight"], w["2.bias"], 2, groups=8)
    y = F.conv2d(y, w["3.weight"], w["3.bias"], 2)
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-6)


def test_tf_same_padding_refuses_other_padding():
    with pytest.raises(MappingError, match=r"surgery tf_same_padding: 0 .*not padded 'same'"):
        SURGERIES.get("tf_same_padding")(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 0)))
    with pytest.raises(MappingError, match="no strided conv"):
        SURGERIES.get("tf_same_padding")(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 1, 1)))


def test_torchvision_mobilenet_v2_needs_the_surgery():
    """Without tf_same_padding the converted weights do not compute what Keras computes: the
    surgery is what makes keras:MobileNetV2 -> torchvision:mobilenet_v2 exact."""
    fn, kwargs, inp = keras_build_args("keras:MobileNetV2")
    fx = make_keras_fixture(fn, kwargs, inp, ["keras"])
    result = converter.convert(fx["files"]["keras"], to="torchvision:mobilenet_v2")
    assert result.surgeries == [{"name": "tf_same_padding"}]
    plain = build_target("torchvision:mobilenet_v2")
    apply_bn_config(plain, result.bn_config)
    plain.load_state_dict(result.torch_state_dict(), strict=True)
    assert rel_err(torch_logits(plain.eval(), fx["x"]), fx["logits"]) > 1e-2
    SURGERIES.get("tf_same_padding")(plain)
    plain.load_state_dict(result.torch_state_dict(), strict=True)
    assert rel_err(torch_logits(plain.eval(), fx["x"]), fx["logits"]) < 1e-4
