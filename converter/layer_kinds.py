"""Layer transforms for the Keras layer kinds beyond keras.applications: Conv1D/Conv3D, transposed
convolutions, depthwise/separable convolutions with a depth multiplier, Embedding, PReLU,
LayerNormalization over the last axis, LSTM/GRU/SimpleRNN and their Bidirectional wrappers.

Each is a named ``LayerTransform`` (registered in ``TRANSFORMS``, imported by transforms.py) with
``pairs`` (the Keras class -> PyTorch module class it converts), a layer-level inverse ``to_keras``
(PyTorch tensors -> Keras variables: what the config-dependent tensor transforms need) and a clear
refusal, naming the layer and the fix, of every configuration PyTorch's module cannot compute."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import MappingError, UnsupportedLayerError
from .transforms import (
    IDENTITY,
    Emitted,
    LayerContext,
    LayerTransform,
    Permute,
    TensorTransform,
    ToShape,
    register,
)

# ---------------------------------------------------------------- tensor transforms

CONV1D_KIO_TO_OIK = Permute((2, 1, 0), "conv1d (k,in,out)->(out,in,k)")
CONV3D_DHWIO_TO_OIDHW = Permute((4, 3, 0, 1, 2), "conv3d DHWIO->OIDHW")
CONVT1D = Permute((2, 1, 0), "conv-transpose1d (k,out,in)->(in,out,k)")
CONVT2D = Permute((3, 2, 0, 1), "conv-transpose2d (h,w,out,in)->(in,out,h,w)")
CONVT3D = Permute((4, 3, 0, 1, 2), "conv-transpose3d (d,h,w,out,in)->(in,out,d,h,w)")


@dataclass(frozen=True, repr=False)
class Depthwise(TensorTransform):
    """Keras depthwise kernel (*k, C, mult) -> grouped conv weight (C*mult, 1, *k): output channel
    c*mult + m, as both frameworks order them. ``mult`` makes it invertible."""

    mult: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        *k, c, m = x.shape
        if m != self.mult:
            raise MappingError(f"{self!r}: kernel {tuple(x.shape)} has depth multiplier {m}")
        n = len(k)
        return np.ascontiguousarray(x.transpose(n, n + 1, *range(n)).reshape(c * m, 1, *k))

    @property
    def inverse(self) -> TensorTransform:
        return DepthwiseBack(self.mult)

    def __repr__(self) -> str:
        return f"depthwise (*k,C,mult={self.mult})->(C*mult,1,*k)"


@dataclass(frozen=True, repr=False)
class DepthwiseBack(TensorTransform):
    """Grouped conv weight (C*mult, 1, *k) -> Keras depthwise kernel (*k, C, mult)."""

    mult: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cm, _, *k = x.shape
        n = len(k)
        y = x.reshape(cm // self.mult, self.mult, *k)
        return np.ascontiguousarray(y.transpose(*range(2, n + 2), 0, 1))

    @property
    def inverse(self) -> TensorTransform:
        return Depthwise(self.mult)

    def __repr__(self) -> str:
        return f"depthwise (C*mult,1,*k)->(*k,C,mult={self.mult})"


@dataclass(frozen=True, repr=False)
class Gates(TensorTransform):
    """A recurrent kernel (in, G*H) -> (G*H, in) or a bias (G*H,) with its G gate blocks put in
    PyTorch's order: PyTorch gate j is Keras gate ``order[j]`` (GRU z,r,h -> r,z,n: (1, 0, 2))."""

    order: tuple[int, ...]
    transpose: bool
    back: bool = False  # the inverse: PyTorch layout and order -> Keras

    def __call__(self, x: np.ndarray) -> np.ndarray:
        g = len(self.order)
        order = np.argsort(self.order) if self.back else np.asarray(self.order)
        if self.transpose and not self.back:
            x = x.T
        if x.shape[0] % g:
            raise MappingError(f"{self!r}: {x.shape[0]} rows are not {g} gates")
        y = x.reshape(g, x.shape[0] // g, *x.shape[1:])[order].reshape(x.shape)
        return np.ascontiguousarray(y.T if self.transpose and self.back else y)

    @property
    def inverse(self) -> TensorTransform:
        return Gates(self.order, self.transpose, not self.back)

    def __repr__(self) -> str:
        what = "kernel (in,G*H)->(G*H,in)" if self.transpose else "bias"
        gates = f"gates {self.order}" if self.order != tuple(range(len(self.order))) else "same"
        return f"{'inverse of ' if self.back else ''}recurrent {what}, {gates} order"


@dataclass(frozen=True, repr=False)
class Reshape(TensorTransform):
    """Reshape between a Keras shape and a PyTorch shape (PReLU's alpha (1,1,C) -> (C,))."""

    source: tuple[int, ...]
    target: tuple[int, ...]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if tuple(x.shape) != self.source:
            raise MappingError(f"{self!r}: got shape {tuple(x.shape)}")
        return np.ascontiguousarray(x.reshape(self.target))

    @property
    def inverse(self) -> TensorTransform:
        return Reshape(self.target, self.source)

    def __repr__(self) -> str:
        return f"reshape {self.source}->{self.target}"


# ---------------------------------------------------------------- layer transforms


class KindTransform(LayerTransform):
    """A layer transform whose tensor transforms may depend on the layer's config and variable
    shapes (``tensor_params``), with ``check`` refusing what PyTorch cannot compute and
    ``to_keras`` the layer-level inverse. ``example``: a config and variable shapes the round-trip
    test uses."""

    pairs: tuple[tuple[str, str], ...] = ()
    example: dict[str, Any] = {"config": {}, "shapes": {"kernel": (3, 4, 6), "bias": (6,)}}

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        """Raise UnsupportedLayerError for a configuration the PyTorch module cannot compute."""

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        """Source variable -> (target parameter, tensor transform) for this layer."""
        return self.params

    def apply(self, ctx: LayerContext) -> Emitted:
        shapes = {v: tuple(t.shape) for v, t in ctx.layer.weights.items()}
        self.check(ctx.layer.name, ctx.layer.config, shapes)
        out = Emitted()
        for var, (param, tt) in self.tensor_params(ctx.layer.config, shapes, ctx.args).items():
            if var in ctx.layer.weights:
                self.emit(ctx, out, var, param, tt)
        return out

    def to_keras(
        self,
        tensors: dict[str, np.ndarray],
        config: dict[str, Any],
        shapes: dict[str, tuple],
        args: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """PyTorch parameters (names relative to the module) -> the Keras layer's variables."""
        params = self.tensor_params(config, shapes, args).items()
        return {var: tt.inverse(tensors[p]) for var, (p, tt) in params if p in tensors}

    def __repr__(self) -> str:
        pairs = ", ".join(f"{k}->{t}" for k, t in self.pairs)
        return f"{self.name}({pairs})"


def _refuse(name: str, what: str, fix: str) -> None:
    raise UnsupportedLayerError(f"layer {name!r}: {what}; {fix}")


@register("conv1d")
class Conv1dTransform(KindTransform):
    """Keras Conv1D -> torch Conv1d (groups and dilation carry over as module arguments): kernel
    (k, in/groups, out) -> (out, in/groups, k), bias as is."""

    pairs = (("Conv1D", "Conv1d"),)
    params = {"kernel": ("weight", CONV1D_KIO_TO_OIK), "bias": ("bias", IDENTITY)}


@register("conv3d")
class Conv3dTransform(KindTransform):
    """Keras Conv3D -> torch Conv3d: kernel DHWIO -> OIDHW, bias as is."""

    pairs = (("Conv3D", "Conv3d"),)
    params = {"kernel": ("weight", CONV3D_DHWIO_TO_OIDHW), "bias": ("bias", IDENTITY)}
    example = {"config": {}, "shapes": {"kernel": (1, 3, 3, 4, 6), "bias": (6,)}}


def transpose_crop(
    kernel: int, stride: int, dilation: int, padding: str, output_padding: int | None
) -> tuple[int, int]:
    """How much of the full transposed output ``(n-1)*s + k_eff`` Keras crops (before, after) on
    one axis (TF's semantics, which Keras' JAX/torch backends reproduce); negative: extended."""
    k = (kernel - 1) * dilation + 1
    if padding == "valid":
        op = max(k, stride) - k if output_padding is None else output_padding
        left, right = k - 1, k - 1 + op
    else:
        pad = stride + k - 2 if output_padding is None else k + k % 2 - 2 + output_padding
        left = min(pad // 2 + pad % 2, k - 1)
        right = pad - left
    return k - 1 - left, k - 1 - right


def transpose_padding(
    kernel: int, stride: int, dilation: int, padding: str, output_padding: int | None
) -> tuple[int, int] | None:
    """The torch ConvTranspose ``(padding, output_padding)`` of one Keras axis, or None when torch
    cannot crop as Keras does: torch crops ``padding`` on both sides and then adds
    ``output_padding`` (< max(stride, dilation)) at the end."""
    before, after = transpose_crop(kernel, stride, dilation, padding, output_padding)
    if before < 0 or not 0 <= before - after < max(stride, dilation):
        return None
    return before, before - after


class ConvTransposeTransform(KindTransform):
    """Keras ConvNDTranspose -> torch ConvTransposeNd: kernel (*k, out, in) -> (in, out, *k), bias
    as is. The module needs ``padding``/``output_padding`` from ``transpose_padding`` (the refusal
    says which); Keras 'same' whose crop is larger after than before (odd kernel, even stride)
    has no torch twin."""

    def apply(self, ctx: LayerContext) -> Emitted:
        """Table arg ``cropped_in_forward = true``: the module crops its output itself (a
        ConvTranspose with padding=0 and a slice in forward), so no refusal."""
        if ctx.args.get("cropped_in_forward"):
            out = Emitted()
            for var, (param, tt) in self.params.items():
                if var in ctx.layer.weights:
                    self.emit(ctx, out, var, param, tt)
            return out
        return super().apply(ctx)

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        n = len(shapes.get("kernel", ())) - 2
        per_axis = [_axis_values(config, key, n) for key in ("kernel_size", "strides")]
        dil = _axis_values(config, "dilation_rate", n)
        out_pad = config.get("output_padding")
        ops = _axis_values(config, "output_padding", n) if out_pad is not None else [None] * n
        padding = str(config.get("padding", "valid")).lower()
        for axis, (k, s, d, op) in enumerate(zip(*per_axis, dil, ops)):
            if transpose_padding(k, s, d, padding, op) is None:
                before, after = transpose_crop(k, s, d, padding, op)
                _refuse(
                    name,
                    f"{config.get('padding')!r} transposed convolution (kernel {k}, stride {s},"
                    f" spatial axis {axis}) crops {before} before and {after} after the full"
                    " output, which torch ConvTranspose (the same padding on both sides,"
                    " output_padding at the end) cannot express",
                    "give the module padding=0, crop the output that way in its forward, and"
                    " set args = { cropped_in_forward = true } on this rule",
                )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = {"kernel": ("weight", cls.layout), "bias": ("bias", IDENTITY)}


def _axis_values(config: dict[str, Any], key: str, n: int) -> list[int]:
    v = config.get(key, 1)
    return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] * n


@register("conv_transpose1d")
class ConvTranspose1dTransform(ConvTransposeTransform):
    pairs = (("Conv1DTranspose", "ConvTranspose1d"),)
    layout = CONVT1D
    example = {"config": {"kernel_size": [3], "strides": [2]}, "shapes": {"kernel": (3, 6, 4)}}


@register("conv_transpose2d")
class ConvTranspose2dTransform(ConvTransposeTransform):
    pairs = (("Conv2DTranspose", "ConvTranspose2d"),)
    layout = CONVT2D
    example = {
        "config": {"kernel_size": [4, 4], "strides": [2, 2], "padding": "same"},
        "shapes": {"kernel": (4, 4, 6, 3), "bias": (6,)},
    }


@register("conv_transpose3d")
class ConvTranspose3dTransform(ConvTransposeTransform):
    pairs = (("Conv3DTranspose", "ConvTranspose3d"),)
    layout = CONVT3D
    example = {"config": {"kernel_size": [2, 2, 2]}, "shapes": {"kernel": (2, 2, 2, 6, 4)}}


@register("depthwise_conv")
class DepthwiseConvTransform(KindTransform):
    """Keras DepthwiseConv1D/2D -> torch Conv1d/2d with groups=C, out_channels=C*depth_multiplier:
    kernel (*k, C, mult) -> (C*mult, 1, *k), bias (C*mult,) as is; invertible for any mult."""

    pairs = (("DepthwiseConv1D", "Conv1d"), ("DepthwiseConv2D", "Conv2d"))
    example = {"config": {"depth_multiplier": 3}, "shapes": {"kernel": (3, 3, 4, 3), "bias": (12,)}}

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        mult = int(config.get("depth_multiplier", shapes.get("kernel", (1,))[-1]))
        return {"kernel": ("weight", Depthwise(mult)), "bias": ("bias", IDENTITY)}


@register("separable_conv1d")
class SeparableConv1dTransform(KindTransform):
    """Keras SeparableConv1D -> a module with a depthwise Conv1d (groups=C, C*mult outputs) and a
    pointwise 1x1 Conv1d: ``depthwise_kernel`` (k, C, mult) -> ``<depthwise>.weight``,
    ``pointwise_kernel`` (1, C*mult, out) -> ``<pointwise>.weight``, ``bias`` ->
    ``<pointwise>.bias``; table args ``depthwise``/``pointwise`` name the children (default
    ``depthwise``, ``pointwise``)."""

    pairs = (("SeparableConv1D", "Conv1d"),)
    example = {
        "config": {"depth_multiplier": 2},
        "shapes": {"depthwise_kernel": (3, 4, 2), "pointwise_kernel": (1, 8, 5), "bias": (5,)},
    }

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        args = args or {}
        dw, pw = args.get("depthwise", "depthwise"), args.get("pointwise", "pointwise")
        mult = int(config.get("depth_multiplier", shapes.get("depthwise_kernel", (1,))[-1]))
        return {
            "depthwise_kernel": (f"{dw}.weight", Depthwise(mult)),
            "pointwise_kernel": (f"{pw}.weight", CONV1D_KIO_TO_OIK),
            "bias": (f"{pw}.bias", IDENTITY),
        }


@register("embedding")
class EmbeddingTransform(KindTransform):
    """Keras Embedding -> torch Embedding: ``embeddings`` (vocab, dim) -> ``weight`` as is."""

    pairs = (("Embedding", "Embedding"),)
    params = {"embeddings": ("weight", IDENTITY)}
    example = {"config": {}, "shapes": {"embeddings": (10, 4)}}


@register("prelu")
class PReLUTransform(KindTransform):
    """Keras PReLU -> torch PReLU(num_parameters=n): ``alpha`` (one non-shared axis of size n, the
    others 1 via ``shared_axes``) -> ``weight`` (n,). torch applies its n alphas along dim 1 (the
    channel axis of NC..., the features of (N, F)); an alpha per position is refused."""

    pairs = (("PReLU", "PReLU"),)
    example = {"config": {"shared_axes": [1, 2]}, "shapes": {"alpha": (1, 1, 6)}}

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        alpha = shapes.get("alpha", ())
        if sum(d > 1 for d in alpha) > 1:
            _refuse(
                name,
                f"PReLU alpha of shape {alpha} varies along more than one axis; torch nn.PReLU"
                " has one alpha per channel (or one for all)",
                "build the Keras layer with shared_axes covering every axis but the channels",
            )

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        alpha = tuple(shapes.get("alpha", (1,)))
        return {"alpha": ("weight", Reshape(alpha, (int(np.prod(alpha)),)))}


@register("layer_norm_last")
class LayerNormLastTransform(KindTransform):
    """Keras LayerNormalization over the trailing axes (axis=-1, or [-2, -1]) -> torch LayerNorm:
    gamma -> weight, beta -> bias (1/0 when scale/center=False and the module has them). torch
    normalizes over trailing dims only: another axis (a channels-first layout) is refused, and
    rms_scaling too. Set the module's eps to the Keras epsilon (default 1e-3, torch's 1e-5)."""

    pairs = (("LayerNormalization", "LayerNorm"),)
    params = {"gamma": ("weight", IDENTITY), "beta": ("bias", IDENTITY)}
    example = {"config": {"axis": -1}, "shapes": {"gamma": (6,), "beta": (6,)}}

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        axis = config.get("axis", -1)
        axes = [int(a) for a in axis] if isinstance(axis, (list, tuple)) else [int(axis)]
        if sorted(axes) != list(range(-len(axes), 0)):
            _refuse(
                name,
                f"LayerNormalization(axis={axis}) is not over the trailing axes by negative"
                " index; torch nn.LayerNorm normalizes the last dims only (a channels-first"
                " layout's channel axis cannot be expressed)",
                "permute to channels-last around nn.LayerNorm and save the Keras layer with"
                " axis=-1, or write a custom module",
            )
        if config.get("rms_scaling"):
            _refuse(
                name,
                "LayerNormalization(rms_scaling=True) is not torch's LayerNorm",
                "use" " torch.nn.RMSNorm-style code and a custom mapping",
            )

    def apply(self, ctx: LayerContext) -> Emitted:
        out = super().apply(ctx)
        shape = next(iter(ctx.layer.weights.values())).shape if ctx.layer.weights else None
        for var, param, fill in (("gamma", "weight", 1.0), ("beta", "bias", 0.0)):
            key = f"{ctx.target}.{param}"
            if var not in ctx.layer.weights and ctx.has(key):
                size = ctx.target_shapes[key] if shape is None else shape
                out.tensors[key] = (np.full(size, fill, np.float32), "", f"fill {fill:g}")
        return out


# ---------------------------------------------------------------- recurrent layers

RECURRENT_ACTIVATION = {"LSTM": "sigmoid", "GRU": "sigmoid"}


class RecurrentTransform(KindTransform):
    """Keras LSTM/GRU/SimpleRNN -> torch nn.LSTM/GRU/RNN layer ``args.layer`` (default 0;
    stacked Keras layers map to l0, l1, ... of one module; batch_first as the module likes):
    ``kernel`` (in, G*H) -> ``weight_ih_l{L}`` (G*H, in) and ``recurrent_kernel`` ->
    ``weight_hh_l{L}``, gate blocks in PyTorch's order; Keras' one bias -> ``bias_ih_l{L}`` with
    ``bias_hh_l{L}`` = 0 (the inverse sums them). Stateful and go_backwards layers, and
    activations other than PyTorch's fixed ones, are refused."""

    order: tuple[int, ...] = (0,)
    two_biases = False  # Keras stores (input bias, recurrent bias): GRU(reset_after=True)
    example = {
        "config": {},
        "shapes": {"kernel": (5, 12), "recurrent_kernel": (3, 12), "bias": (12,)},
    }

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        cls = self.pairs[0][0]
        for key, bad, why in (
            ("stateful", True, "carries its state across batches"),
            ("go_backwards", True, "reads the sequence backwards (torch: flip it in forward)"),
        ):
            if config.get(key) == bad:
                _refuse(name, f"{cls}({key}=True) {why}", "convert a non-stateful forward copy")
        acts = {"activation": ("tanh",) if cls != "SimpleRNN" else ("tanh", "relu")}
        if cls in RECURRENT_ACTIVATION:
            acts["recurrent_activation"] = (RECURRENT_ACTIVATION[cls],)
        for key, allowed in acts.items():
            if config.get(key, allowed[0]) not in allowed:
                _refuse(
                    name,
                    f"{cls}({key}={config.get(key)!r}): torch's {self.pairs[0][1]} uses"
                    f" {' or '.join(allowed)}",
                    "write a custom cell",
                )

    def cell(self, transpose: bool = True) -> Gates:
        return Gates(self.order, transpose)

    def emit_cell(self, ctx: LayerContext, out: Emitted, prefix: str, suffix: str) -> None:
        """One direction: ``<prefix>kernel`` etc. -> ``weight_ih<suffix>`` etc."""
        self.emit(ctx, out, f"{prefix}kernel", f"weight_ih{suffix}", self.cell())
        self.emit(ctx, out, f"{prefix}recurrent_kernel", f"weight_hh{suffix}", self.cell())
        if f"{prefix}bias" not in ctx.layer.weights:
            return
        ih, hh = self.biases(ctx.var(f"{prefix}bias"))
        key = f"{ctx.target}.bias_ih{suffix}"
        if not ctx.has(key):
            return  # a torch module with bias=False: the ledger reports the bias unmapped
        src = ctx.layer.keys.get(f"{prefix}bias", f"{prefix}bias")
        out.tensors[key] = (ih, src, f"{self.cell(False)!r} (input bias)")
        out.tensors[f"{ctx.target}.bias_hh{suffix}"] = (hh, src, self.hh_repr)
        out.consumed.add(f"{prefix}bias")

    hh_repr = "zeros (Keras has one bias)"

    def biases(self, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keras bias -> (bias_ih, bias_hh) in PyTorch's gate order."""
        ih = self.cell(False)(bias)
        return ih, np.zeros_like(ih)

    def keras_bias(self, ih: np.ndarray, hh: np.ndarray) -> np.ndarray:
        return self.cell(False).inverse(ih + hh)

    def suffix(self, args: dict[str, Any] | None, reverse: bool = False) -> str:
        return f"_l{int((args or {}).get('layer', 0))}" + ("_reverse" if reverse else "")

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        """The weights' places and layouts (what drafting checks shapes with); the bias, which
        also fills ``bias_hh``, is emitted by ``emit_cell``."""
        return self.cell_params("", self.suffix(args))

    def cell_params(self, prefix: str, suffix: str) -> dict[str, tuple[str, TensorTransform]]:
        out = {
            f"{prefix}kernel": (f"weight_ih{suffix}", self.cell()),
            f"{prefix}recurrent_kernel": (f"weight_hh{suffix}", self.cell()),
        }
        if not self.two_biases:  # GRU's (2, 3H) bias goes to two parameters: emit_cell does it
            out[f"{prefix}bias"] = (f"bias_ih{suffix}", self.cell(False))
        return out

    def apply(self, ctx: LayerContext) -> Emitted:
        self.check(ctx.layer.name, ctx.layer.config, {})
        out = Emitted()
        self.emit_cell(ctx, out, "", self.suffix(ctx.args))
        return out

    def to_keras(
        self,
        tensors: dict[str, np.ndarray],
        config: dict[str, Any],
        shapes: dict[str, tuple],
        args: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        return self.cell_to_keras(tensors, "", self.suffix(args))

    def cell_to_keras(
        self, tensors: dict[str, np.ndarray], prefix: str, suffix: str
    ) -> dict[str, np.ndarray]:
        inv = self.cell().inverse
        out = {
            f"{prefix}kernel": inv(tensors[f"weight_ih{suffix}"]),
            f"{prefix}recurrent_kernel": inv(tensors[f"weight_hh{suffix}"]),
        }
        if f"bias_ih{suffix}" in tensors:
            ih, hh = tensors[f"bias_ih{suffix}"], tensors[f"bias_hh{suffix}"]
            out[f"{prefix}bias"] = self.keras_bias(ih, hh)
        return out


@register("lstm")
class LSTMTransform(RecurrentTransform):
    """Keras gates i, f, c, o are torch's i, f, g, o: the same order."""

    pairs = (("LSTM", "LSTM"),)
    order = (0, 1, 2, 3)


@register("simple_rnn")
class SimpleRNNTransform(RecurrentTransform):
    """Keras SimpleRNN -> torch nn.RNN (nonlinearity = the Keras activation, tanh or relu)."""

    pairs = (("SimpleRNN", "RNN"),)
    order = (0,)
    example = {
        "config": {},
        "shapes": {"kernel": (5, 4), "recurrent_kernel": (4, 4), "bias": (4,)},
    }


@register("gru")
class GRUTransform(RecurrentTransform):
    """Keras gates z, r, h -> torch r, z, n. ``reset_after=True`` (Keras 2.3+ default) is torch's
    GRU: the bias (2, 3H) is (input bias, recurrent bias) -> ``bias_ih``, ``bias_hh``.
    ``reset_after=False`` applies the reset gate before the recurrent matmul: no torch twin."""

    pairs = (("GRU", "GRU"),)
    order = (1, 0, 2)
    two_biases = True
    example = {
        "config": {"reset_after": True},
        "shapes": {"kernel": (5, 9), "recurrent_kernel": (3, 9), "bias": (2, 9)},
    }
    hh_repr = "recurrent bias, gates z,r,h -> r,z,n"

    def check(self, name: str, config: dict[str, Any], shapes: dict[str, tuple]) -> None:
        super().check(name, config, shapes)
        if not config.get("reset_after", True):
            _refuse(
                name,
                "GRU(reset_after=False) applies the reset gate before the recurrent matmul;"
                " torch's GRU applies it after (reset_after=True) and has no other variant",
                "retrain with reset_after=True, or write a custom GRU cell",
            )

    def biases(self, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if bias.ndim != 2 or bias.shape[0] != 2:
            raise MappingError(f"GRU bias of shape {bias.shape}: expected (2, 3*units)")
        return self.cell(False)(bias[0]), self.cell(False)(bias[1])

    def keras_bias(self, ih: np.ndarray, hh: np.ndarray) -> np.ndarray:
        inv = self.cell(False).inverse
        return np.stack([inv(ih), inv(hh)])


RECURRENT = {"LSTM": "lstm", "GRU": "gru", "SimpleRNN": "simple_rnn"}


@register("bidirectional")
class BidirectionalTransform(KindTransform):
    """Keras Bidirectional(LSTM/GRU/SimpleRNN, merge_mode='concat') -> the torch module with
    ``bidirectional=True``: ``forward/*`` -> ``*_l{L}``, ``backward/*`` -> ``*_l{L}_reverse``
    (the inner layer's transform and refusals apply to each direction)."""

    pairs = (("Bidirectional", "LSTM"), ("Bidirectional", "GRU"), ("Bidirectional", "RNN"))
    example = {
        "config": {"layer": {"class_name": "LSTM", "config": {}}, "merge_mode": "concat"},
        "shapes": {
            f"{d}/{v}": s
            for d in ("forward", "backward")
            for v, s in (("kernel", (5, 12)), ("recurrent_kernel", (3, 12)), ("bias", (12,)))
        },
    }

    def inner(self, name: str, config: dict[str, Any]) -> RecurrentTransform:
        from .transforms import TRANSFORMS

        cls = config.get("layer", {}).get("class_name", "")
        if cls not in RECURRENT:
            _refuse(name, f"Bidirectional({cls or '?'})", "wrap an LSTM, GRU or SimpleRNN")
        if config.get("merge_mode", "concat") != "concat":
            _refuse(
                name,
                f"Bidirectional(merge_mode={config.get('merge_mode')!r}): torch concatenates",
                "save the Keras model with merge_mode='concat' or merge in your module",
            )
        inner = TRANSFORMS.get(RECURRENT[cls])
        inner_cfg = {**config["layer"].get("config", {}), "go_backwards": False}
        inner.check(name, inner_cfg, {})
        return inner

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        inner, out = self.inner("", config), {}
        for prefix, reverse in (("forward/", False), ("backward/", True)):
            out.update(inner.cell_params(prefix, inner.suffix(args, reverse)))
        return out

    def apply(self, ctx: LayerContext) -> Emitted:
        inner = self.inner(ctx.layer.name, ctx.layer.config)
        out = Emitted()
        for prefix, reverse in (("forward/", False), ("backward/", True)):
            inner.emit_cell(ctx, out, prefix, inner.suffix(ctx.args, reverse))
        return out

    def to_keras(
        self,
        tensors: dict[str, np.ndarray],
        config: dict[str, Any],
        shapes: dict[str, tuple],
        args: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        inner, out = self.inner("", config), {}
        for prefix, reverse in (("forward/", False), ("backward/", True)):
            out.update(inner.cell_to_keras(tensors, prefix, inner.suffix(args, reverse)))
        return out


CUSTOM_PAIR = ("*", "*")  # drafting: a source kind no transform pairs (a user's own Keras layer)


@register("same_names")
class SameNamesTransform(KindTransform):
    """A user's own Keras layer (a class no other transform pairs) -> a module whose parameters
    carry its variables' names: each variable copied as it is, or reshaped where only size-1 axes
    differ (table ``args``: parameter name -> target shape, e.g. ``{ gain = [4, 1, 1] }``).
    Drafting offers it for custom layers only; the aligner still checks every shape and the data
    flow, and the conversion names any parameter no variable fills."""

    pairs = (CUSTOM_PAIR,)
    example: dict[str, Any] = {"config": {}, "shapes": {"gain": (4,), "shift": (4,)}}
    BARE = re.compile(r"^[A-Za-z0-9_-]+$")  # a TOML bare key: what the drafted args can name

    def draft_args(self, target_attrs: dict[str, Any]) -> dict[str, Any] | None:
        tensors = target_attrs.get("tensors") or {}
        if not tensors or not all(self.BARE.match(p) for p in tensors):
            return None
        return {p: [int(d) for d in s] for p, s in tensors.items()}

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        args = args or {}
        return {
            var: (var, ToShape(tuple(args[var]), shape) if var in args else IDENTITY)
            for var, shape in shapes.items()
        }
