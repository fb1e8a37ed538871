"""Emitters for the layers keras.applications uses: convolutions, normalization, dense, pooling,
padding and cropping, activations, merges, reshapes, dropout and preprocessing."""

from __future__ import annotations

from typing import Any

from .activations import ACTIVATIONS, activation_name
from .emitters import (
    ANY,
    CF,
    CL,
    Emitter,
    Piece,
    Site,
    call,
    channel_dim,
    comparable,
    emitter,
    number,
    short,
    tup,
)


class Unsupported(Exception):
    """This call cannot be ported (the layer becomes a stub); the message says why."""


def with_activation(site: Site, expr: str, rank: int, layout: str) -> tuple[str, bool]:
    """``expr`` wrapped in the layer's fused activation; True when there is none."""
    name = activation_name(site.get("activation", "linear"))
    if name is None:
        raise Unsupported(f"activation {site.get('activation')!r} has no PyTorch twin")
    if name == "linear":
        return expr, True
    dim = channel_dim(rank, layout, -1)
    return ACTIVATIONS.get(name).function.format(x=expr, dim=dim), False


def same_padding(site: Site, kernel: tuple, stride: tuple, dilation: tuple) -> tuple[Any, str]:
    """(constructor ``padding``, forward input expression) for Keras ``padding``: symmetric when
    PyTorch's padding equals TensorFlow's, ``"same"`` for stride 1, else an explicit
    ``pad_same`` in forward (TF puts the odd cell after)."""
    mode = site.get("padding", "valid")
    if mode == "valid":
        return None, "{x}"
    if mode == "causal":
        left = (kernel[0] - 1) * dilation[0]
        return None, f"F.pad({{x}}, ({left}, 0))"
    if all(s == 1 for s in stride):
        totals = [(k - 1) * d for k, d in zip(kernel, dilation)]
        if all(t % 2 == 0 for t in totals):
            return short(tuple(t // 2 for t in totals)), "{x}"
        return '"same"', "{x}"
    return None, f"pad_same({{x}}, {kernel}, {stride}, {dilation})"


def conv_parts(site: Site) -> tuple[tuple, tuple, tuple, Any, str]:
    n = site.spatial
    kernel = tup(site.get("kernel_size"), n)
    stride = tup(site.get("strides", 1), n)
    dilation = tup(site.get("dilation_rate", 1), n)
    padding, inner = same_padding(site, kernel, stride, dilation)
    return kernel, stride, dilation, padding, inner


def check_channels_last(site: Site) -> None:
    if site.get("data_format", "channels_last") != "channels_last":
        raise Unsupported("data_format='channels_first' is not supported yet")


def conv_piece(site: Site, init: str, transform: str, **extra: Any) -> Piece:
    """The Piece of a convolution-like layer whose input expression and activation are done."""
    *_, padding, inner = conv_parts(site)
    expr, plain = with_activation(site, "{m}(" + inner + ")", site.rank, CF)
    helpers = ("pad_same",) if "pad_same" in inner else ()
    return Piece(init, expr, site.rank, CF, transform, helpers=helpers, tap=plain, **extra)


@emitter("Conv1D", "Conv2D", "Conv3D")
class Conv(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride, dilation, padding, _ = conv_parts(site)
        *_, c_in, c_out = site.weights["kernel"]
        groups = int(site.get("groups", 1))
        init = call(
            f"nn.Conv{site.spatial}d",
            c_in * groups,
            c_out,
            short(kernel),
            stride=short(stride) if max(stride) > 1 else None,
            padding=padding,
            dilation=short(dilation) if max(dilation) > 1 else None,
            groups=groups if groups > 1 else None,
            bias=None if "bias" in site.weights else False,
        )
        return conv_piece(site, init, f"conv{site.spatial}d")


@emitter("DepthwiseConv2D")
class DepthwiseConv(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride, dilation, padding, _ = conv_parts(site)
        _, _, channels, multiplier = site.weights["kernel"]
        init = call(
            "nn.Conv2d",
            channels,
            channels * multiplier,
            short(kernel),
            stride=short(stride) if max(stride) > 1 else None,
            padding=padding,
            dilation=short(dilation) if max(dilation) > 1 else None,
            groups=channels,
            bias=None if "bias" in site.weights else False,
        )
        return conv_piece(site, init, "depthwise_conv2d")


@emitter("SeparableConv2D")
class SeparableConv(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride, dilation, padding, _ = conv_parts(site)
        _, _, channels, multiplier = site.weights["depthwise_kernel"]
        out = site.weights["pointwise_kernel"][-1]
        init = call(
            "SeparableConv2d",
            channels,
            out,
            short(kernel),
            stride=short(stride) if max(stride) > 1 else None,
            padding=padding,
            dilation=short(dilation) if max(dilation) > 1 else None,
            depth_multiplier=multiplier if multiplier > 1 else None,
            bias=None if "bias" in site.weights else False,
        )
        args = {"depthwise": "depthwise", "pointwise": "pointwise"}
        return conv_piece(site, init, "separable_conv2d", args=args, classes=("SeparableConv2d",))


@emitter("Dense")
class Dense(Emitter):
    wants = CL

    def emit(self, site: Site) -> Piece:
        c_in, c_out = site.weights["kernel"]
        bias = None if "bias" in site.weights else False
        expr, plain = with_activation(site, "{m}({x})", site.rank, CL)
        init = call("nn.Linear", c_in, c_out, bias=bias)
        return Piece(init, expr, site.rank, CL, "dense", tap=plain and comparable(site.rank, CL))


@emitter("BatchNormalization")
class BatchNorm(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        axis = site.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or axis % site.rank != site.rank - 1:
            raise Unsupported(f"BatchNormalization over axis {axis} (not the channel axis)")
        if site.get("renorm", False):
            raise Unsupported("BatchNormalization(renorm=True) has no PyTorch twin")
        channels = site.weights["moving_mean"][0]
        scale, center = site.get("scale", True), site.get("center", True)
        init = call(
            f"nn.BatchNorm{max(site.rank - 2, 1)}d",
            channels,
            eps=number(site.get("epsilon", 1e-3)),
            momentum=number(1.0 - float(site.get("momentum", 0.99))),
            affine=None if scale or center else False,
        )
        after = []
        for keep, param, what in ((scale, "weight", "scale"), (center, "bias", "center")):
            if (scale or center) and not keep:
                after.append(f"{{m}}.{param}.requires_grad_(False)  # Keras {what}=False")
        layout = CF if site.rank > 2 else CL
        return Piece(init, "{m}({x})", site.rank, layout, "batch_norm", after=after)


@emitter("LayerNormalization")
class LayerNorm(Emitter):
    wants = CL

    def emit(self, site: Site) -> Piece:
        axis = site.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or axis % site.rank != site.rank - 1:
            raise Unsupported(f"LayerNormalization over axis {axis} (only the last axis)")
        if site.get("rms_scaling", False):
            raise Unsupported("LayerNormalization(rms_scaling=True)")
        shape = site.weights.get("gamma") or site.weights.get("beta")
        if not shape:
            raise Unsupported("LayerNormalization without scale and center")
        affine = None if "gamma" in site.weights and "beta" in site.weights else False
        if affine is False:
            raise Unsupported("LayerNormalization with only one of scale/center")
        init = call("nn.LayerNorm", shape[0], eps=number(site.get("epsilon", 1e-3)))
        tap = comparable(site.rank, CL)
        return Piece(init, "{m}({x})", site.rank, CL, "layer_norm", tap=tap)


@emitter("LayerScale")
class LayerScale(Emitter):
    """keras.applications ConvNeXt's LayerScale: ``x * gamma`` over the channels (last axis)."""

    wants = CL

    def emit(self, site: Site) -> Piece:
        (shape,) = site.weights.values()
        return Piece(
            call("LayerScale", shape[-1]),
            "{m}({x})",
            site.rank,
            CL,
            "layer_scale",
            args={"param": "gamma"},
            classes=("LayerScale",),
            tap=comparable(site.rank, CL),
        )
