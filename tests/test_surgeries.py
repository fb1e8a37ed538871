"""Layer transforms and surgeries checked numerically against their definitions, in PyTorch
(no TensorFlow): Keras SeparableConv2D semantics, TF 'same' max pooling, Keras 'same' average
pooling (padding excluded)."""

from __future__ import annotations

import torchvision  # noqa: F401  (torch side first; see CONTRIBUTING.md)

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from converter.errors import MappingError
from converter.formats import RawTensor
from converter.source import SourceLayer
from converter.surgeries import SURGERIES
from converter.transforms import TRANSFORMS, LayerContext


def _layer(name: str, cls: str, **arrays: np.ndarray) -> SourceLayer:
    weights = {
        k: RawTensor(f"{name}/{k}", v.shape, str(v.dtype), lambda v=v: v) for k, v in arrays.items()
    }
    return SourceLayer(name, cls, {}, "file", weights, {k: f"{name}/{k}" for k in arrays})


def keras_separable_conv(
    x: np.ndarray, dw: np.ndarray, pw: np.ndarray, bias: np.ndarray
) -> np.ndarray:
    """Keras SeparableConv2D (stride 1, 'same', NHWC) from its definition, in float64: depthwise
    output channel c*mult + m = sum over the window of x[..., c] * dw[i, j, c, m]; then 1x1 conv."""
    h, w, c, mult = dw.shape
    n, hh, ww, _ = x.shape
    xp = np.pad(x, ((0, 0), (h // 2, h // 2), (w // 2, w // 2), (0, 0)))
    mid = np.zeros((n, hh, ww, c, mult))
    for i in range(h):
        for j in range(w):
            mid += xp[:, i : i + hh, j : j + ww, :, None] * dw[i, j]
    return mid.reshape(n, hh, ww, c * mult) @ pw[0, 0] + bias


@pytest.mark.parametrize("mult", [1, 2])
def test_separable_conv2d_transform_computes_keras_separable_conv(mult):
    rng = np.random.default_rng(0)
    c, out = 3, 5
    dw = rng.normal(size=(3, 3, c, mult)).astype(np.float32)
    pw = rng.normal(size=(1, 1, c * mult, out)).astype(np.float32)
    bias = rng.normal(size=(out,)).astype(np.float32)
    target = torch.nn.Module()
    target.dw = torch.nn.Conv2d(c, c * mult, 3, padding=1, groups=c, bias=False)
    target.pw = torch.nn.Conv2d(c * mult, out, 1)
    shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    layer = _layer("sep", "SeparableConv2D", depthwise_kernel=dw, pointwise_kernel=pw, bias=bias)
    em = TRANSFORMS.get("separable_conv2d").apply(
        LayerContext(layer, "", shapes, {"depthwise": "dw", "pointwise": "pw"})
    )
    assert set(em.tensors) == set(shapes) and em.consumed == {
        "depthwise_kernel",
        "pointwise_kernel",
        "bias",
    }
    target.load_state_dict(
        {k: torch.from_numpy(a) for k, (a, _, _) in em.tensors.items()}, strict=True
    )
    x = rng.normal(size=(2, 6, 7, c))
    with torch.no_grad():
        got = (
            target.pw(target.dw(torch.from_numpy(x).permute(0, 3, 1, 2).float()))
            .permute(0, 2, 3, 1)
            .numpy()
        )
    np.testing.assert_allclose(got, keras_separable_conv(x, dw, pw, bias), rtol=1e-5, atol=1e-5)


def test_separable_conv2d_defaults_and_inverse():
    """Default children are timm's SeparableConv2d (conv1, pointwise); the tensor transforms
    invert."""
    t = TRANSFORMS.get("separable_conv2d")
    rng = np.random.default_rng(1)
    dw = rng.normal(size=(3, 3, 4, 1)).astype(np.float32)
    pw = rng.normal(size=(1, 1, 4, 6)).astype(np.float32)
    shapes = {"m.conv1.weight": (4, 1, 3, 3), "m.pointwise.weight": (6, 4, 1, 1)}
    em = t.apply(
        LayerContext(
            _layer("s", "SeparableConv2D", depthwise_kernel=dw, pointwise_kernel=pw),
            "m",
            shapes,
            {},
        )
    )
    assert {k: a.shape for k, (a, _, _) in em.tensors.items()} == shapes
    inv = t.inverse_params()
    back_dw = inv["conv1.weight"][1](em.tensors["m.conv1.weight"][0])
    back_pw = inv["pointwise.weight"][1](em.tensors["m.pointwise.weight"][0])
    assert (
        inv["conv1.weight"][0] == "depthwise_kernel"
        and inv["pointwise.weight"][0] == "pointwise_kernel"
    )
    np.testing.assert_array_equal(back_dw, dw)
    np.testing.assert_array_equal(back_pw, pw)
    assert "depthwise_kernel->conv1.weight" in repr(t)


def tf_same_max_pool(x: torch.Tensor, k: int = 3, s: int = 2) -> torch.Tensor:
    """TF 'SAME' max pooling from its definition: output ceil(n/s), total padding
    max((out-1)*s + k - n, 0), the smaller half before."""
    pads = []
    for n in reversed(x.shape[-2:]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=-float("inf")), k, s)


@pytest.mark.parametrize("size,differs", [(6, True), (7, False), (74, True)])
def test_tf_same_max_pools(size, differs):
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.MaxPool2d(3, 2, 1))
    x = torch.randn(2, 3, size, size) - 1.0  # negative values: padding must be -inf, not 0
    before = model(x)
    SURGERIES.get("tf_same_max_pools")(model, modules=["1"])
    after = model(x)
    torch.testing.assert_close(after, tf_same_max_pool(x), rtol=0, atol=0)
    assert after.shape == before.shape and (not torch.equal(after, before)) is differs
    with pytest.raises(MappingError, match="not nn.MaxPool2d"):
        SURGERIES.get("tf_same_max_pools")(model, modules=["0"])
    with pytest.raises(MappingError, match="no module 'nope'"):
        SURGERIES.get("tf_same_max_pools")(model, modules=["nope"])


class _PoolThenConv(torch.nn.Module):
    """Like torchvision's Inception blocks: a functional 3x3/1 average pool feeding a module."""

    def __init__(self) -> None:
        super().__init__()
        self.branch_pool = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))


def test_avg_pool_exclude_padding_on_a_functional_pool():
    torch.manual_seed(0)
    model = _PoolThenConv()
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        want = model.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))
        assert not torch.allclose(
            model(x), want, atol=1e-3
        )  # the border differs before the surgery
        SURGERIES.get("avg_pool_exclude_padding")(model, consumers=["branch_pool"])
        torch.testing.assert_close(model(x), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(MappingError, match="applied twice"):
        SURGERIES.get("avg_pool_exclude_padding")(model, consumers=["branch_pool"])


def test_avg_pool_exclude_padding_on_torchvision_inception():
    """On the real target, the rescaled branch_pool input is the padding-excluding average of the
    block input, in every block the table names (Mixed_7b/7c are 1x1 here: average = the value)."""
    from converter.model import build_target
    from converter.tables import builtin_tables

    variant = next(v for t in builtin_tables() if t.id == "keras-inception-v3" for v in t.variants)
    model = build_target(variant.target, **variant.target_kwargs).eval()
    (surgery,) = variant.surgeries
    SURGERIES.get(surgery["name"])(model, **surgery["args"])
    mods = dict(model.named_modules())
    seen: dict[str, tuple] = {}
    for path in surgery["args"]["consumers"]:
        block = path.split(".")[0]
        mods[block].register_forward_pre_hook(
            lambda m, a, b=block: seen.__setitem__(b + ".in", a[0])
        )
        mods[path].conv.register_forward_pre_hook(lambda m, a, p=path: seen.__setitem__(p, a[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 75, 75))
    for path in surgery["args"]["consumers"]:
        want = F.avg_pool2d(seen[path.split(".")[0] + ".in"], 3, 1, 1, count_include_pad=False)
        torch.testing.assert_close(seen[path], want, rtol=1e-5, atol=1e-6)
