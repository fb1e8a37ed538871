"""Named transforms: tensor-level (with an inverse and a readable repr) and layer-level (which
source variables become which target tensors). Both are registries; tables refer to them by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import MappingError, UnsupportedLayerError
from .registry import Registry

# ---------------------------------------------------------------- tensor transforms


NO_BYTES = np.dtype([])  # a structured dtype with no fields: itemsize 0


class TensorTransform:
    """A pure function on one array, with an inverse (PyTorch -> Keras) and a readable repr."""

    name = "tensor"

    def __call__(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The output shape for an input of ``shape``: the transform run on an array of a
        zero-byte dtype (layout transforms move no bytes: a 4096x4096 kernel costs nothing), on
        float32 where it computes with values."""
        if not shape:
            return ()
        try:
            return tuple(self(np.empty(shape, dtype=NO_BYTES)).shape)
        except (TypeError, ValueError):  # numpy refuses arithmetic on a dtype without fields
            return tuple(self(np.empty(shape, dtype=np.float32)).shape)

    @property
    def inverse(self) -> "TensorTransform":  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class Identity(TensorTransform):
    """Leaves the array as it is (biases, BN vectors)."""

    name = "identity"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x

    @property
    def inverse(self) -> TensorTransform:
        return self


@dataclass(frozen=True, repr=False)
class Permute(TensorTransform):
    """Transpose by ``axes`` (``np.transpose``); ``label`` is the readable repr."""

    axes: tuple[int, ...]
    label: str = ""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != len(self.axes):
            raise MappingError(
                f"{self!r} expects a {len(self.axes)}-d tensor, got shape {tuple(x.shape)}"
            )
        if self.axes == (3, 2, 0, 1):  # a conv kernel, HWIO -> OIHW
            h, w, i, o = x.shape
            return _swap_outer(x.reshape(h * w, i, o)).reshape(o, i, h, w)
        if self.axes == (1, 0):  # a Dense kernel, (in, out) -> (out, in)
            return _swap_outer(x[None]).reshape(x.shape[1], x.shape[0])
        return np.ascontiguousarray(np.transpose(x, self.axes))

    @property
    def inverse(self) -> TensorTransform:
        return Permute(
            tuple(int(i) for i in np.argsort(self.axes)), f"inverse of {self.label or self.axes}"
        )

    def __repr__(self) -> str:
        return self.label or f"permute{self.axes}"


# Tiles of (256 outputs x 32 inputs) x every kernel position: 32 KiB a kernel position, so a tile's
# strided reads and writes stay in cache (benchmarks/transpose_tiles.py measures the choice).
TRANSPOSE_TILE = (256, 32)  # (outputs, inputs)


def _swap_outer(x: np.ndarray) -> np.ndarray:
    """``x`` (k, i, o) -> contiguous (o, i, k), tile by tile: numpy's strided copy of the whole
    transposed view misses the cache on every read once a kernel is larger than it; tiles make a
    ResNet's 1x1 (i, o) = (1024, 2048) and 3x3 (512, 512) kernels 7-8x faster."""
    k, i, o = x.shape
    to, ti = TRANSPOSE_TILE
    out = np.empty((o, i, k), dtype=x.dtype)
    for s in range(0, o, to):
        for t in range(0, i, ti):
            out[s : s + to, t : t + ti] = x[:, t : t + ti, s : s + to].T
    return out


class DepthwiseToTorch(TensorTransform):
    """Keras depthwise kernel (h, w, C, mult) -> PyTorch grouped conv weight (C*mult, 1, h, w)."""

    name = "depthwise (h,w,C,mult)->(C*mult,1,h,w)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h, w, c, m = x.shape
        return np.ascontiguousarray(x.transpose(2, 3, 0, 1).reshape(c * m, 1, h, w))

    @property
    def inverse(self) -> TensorTransform:
        return DepthwiseFromTorch()


class DepthwiseFromTorch(TensorTransform):
    """PyTorch grouped conv weight (C, 1, h, w) -> Keras depthwise kernel (h, w, C, 1).

    Only depth multiplier 1 can be inverted: (C*mult, 1, h, w) does not say what mult was."""

    name = "depthwise (C*mult,1,h,w)->(h,w,C,mult), mult=1"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        cm, _, h, w = x.shape
        return np.ascontiguousarray(x.reshape(cm, 1, h, w).transpose(2, 3, 0, 1))

    @property
    def inverse(self) -> TensorTransform:
        return DepthwiseToTorch()


class Conv1x1ToLinear(TensorTransform):
    """Keras 1x1 conv kernel (1, 1, in, out) -> Linear weight (out, in)."""

    name = "1x1-conv (1,1,in,out)->linear (out,in)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[:2] != (1, 1):
            raise MappingError(f"{self!r} needs a 1x1 kernel, got shape {tuple(x.shape)}")
        return np.ascontiguousarray(x[0, 0].T)

    @property
    def inverse(self) -> TensorTransform:
        return LinearTo1x1Conv()


class LinearTo1x1Conv(TensorTransform):
    """Linear weight (out, in) -> Keras 1x1 conv kernel (1, 1, in, out)."""

    name = "linear (out,in)->1x1-conv (1,1,in,out)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T[None, None])

    @property
    def inverse(self) -> TensorTransform:
        return Conv1x1ToLinear()


@dataclass(frozen=True, repr=False)
class FlattenNHWCToNCHW(TensorTransform):
    """Dense kernel after Flatten: rows in (H, W, C) order -> Linear weight (out, C*H*W)."""

    hwc: tuple[int, int, int]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h, w, c = self.hwc
        if x.shape[0] != h * w * c:
            raise MappingError(
                f"{self!r}: kernel has {x.shape[0]} rows, expected {h}*{w}*{c}={h * w * c}"
            )
        return np.ascontiguousarray(
            x.reshape(h, w, c, -1).transpose(3, 2, 0, 1).reshape(x.shape[1], -1)
        )

    @property
    def inverse(self) -> TensorTransform:
        return FlattenNCHWToNHWC(self.hwc)

    def __repr__(self) -> str:
        return f"flatten-reorder NHWC{self.hwc}->NCHW, transpose"


@dataclass(frozen=True, repr=False)
class FlattenNCHWToNHWC(TensorTransform):
    """Linear weight (out, C*H*W) -> Dense kernel after Flatten, rows in (H, W, C) order."""

    hwc: tuple[int, int, int]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h, w, c = self.hwc
        return np.ascontiguousarray(
            x.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
        )

    @property
    def inverse(self) -> TensorTransform:
        return FlattenNHWCToNCHW(self.hwc)

    def __repr__(self) -> str:
        return f"flatten-reorder NCHW->NHWC{self.hwc}, transpose"


IDENTITY = Identity()
CONV_HWIO_TO_OIHW = Permute((3, 2, 0, 1), "conv HWIO->OIHW")
DENSE_IN_OUT_TO_OUT_IN = Permute((1, 0), "dense (in,out)->(out,in)")

# ---------------------------------------------------------------- layer transforms


@dataclass
class Emitted:
    """What a layer transform produces: target tensors, later adjustments, BN settings."""

    tensors: dict[str, tuple[np.ndarray, str, str]] = field(
        default_factory=dict
    )  # key -> (array, source key, repr)
    adjust: list[tuple[str, str, np.ndarray, str]] = field(
        default_factory=list
    )  # (key, op, array, why)
    bn: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> bn config
    consumed: set[str] = field(default_factory=set)  # source variable names used


@dataclass
class LayerContext:
    """Everything a layer transform may look at."""

    layer: Any  # SourceLayer
    target: str  # target module path
    target_shapes: dict[str, tuple[int, ...]]  # all target keys -> shapes
    args: dict[str, Any]
    fold_bias: str | None = None  # target BN module that absorbs this conv's bias

    def has(self, key: str) -> bool:
        return key in self.target_shapes

    def var(self, name: str) -> np.ndarray:
        return self.layer.load(name)


class LayerTransform:
    """Which source variables of one Keras layer become which target tensors.

    ``params`` maps each source variable to (target parameter name, tensor transform); subclasses
    override ``apply`` when a layer needs more than that (fills, BN settings, reshapes)."""

    name = "layer"
    #: transform applied to each source variable -> (target param name, tensor transform)
    params: dict[str, tuple[str, TensorTransform]] = {}
    #: (Keras layer class, torch module class name) pairs this transform converts: drafted
    #: mappings (converter/drafting) index the registry by them
    pairs: tuple[tuple[str, str], ...] = ()

    def draft_args(self, target_attrs: dict[str, Any]) -> dict[str, Any] | None:
        """The table ``args`` a drafted rule gives this transform for a target module whose traced
        attributes are ``target_attrs`` (converter/drafting/target.py), or None when this transform
        does not fit that module (shapes aside)."""
        return {}

    def tensor_params(
        self, config: dict[str, Any], shapes: dict[str, tuple], args: dict[str, Any] | None = None
    ) -> dict[str, tuple[str, TensorTransform]]:
        """Source variable -> (target parameter, tensor transform) for a layer with this config
        and these variable shapes: ``params`` here; transforms whose layout depends on the layer
        override it (drafting checks shapes through it)."""
        return self.params

    def apply(self, ctx: LayerContext) -> Emitted:
        out = Emitted()
        for var, (param, tensor_transform) in self.params.items():
            if var not in ctx.layer.weights:
                continue
            self.emit(ctx, out, var, param, tensor_transform)
        return out

    def emit(
        self,
        ctx: LayerContext,
        out: Emitted,
        var: str,
        param: str,
        tensor_transform: TensorTransform,
    ) -> None:
        """Put source variable ``var`` at ``<target>.<param>``; a bias the target has no place
        for is folded into ``fold_bias``'s running mean when the rule says so, else left
        unconsumed."""
        key = f"{ctx.target}.{param}" if ctx.target else param
        arr = ctx.var(var)
        if var == "bias" and not ctx.has(key):
            if ctx.fold_bias is None:
                return  # left unconsumed: strict accounting reports it
            out.adjust.append(
                (
                    f"{ctx.fold_bias}.running_mean",
                    "sub",
                    arr.astype(np.float32, copy=False),
                    f"bias of {ctx.layer.name} folded into {ctx.fold_bias}.running_mean",
                )
            )
            out.consumed.add(var)
            return
        out.tensors[key] = (
            tensor_transform(arr),
            ctx.layer.keys.get(var, var),
            repr(tensor_transform),
        )
        out.consumed.add(var)

    def inverse_params(self) -> dict[str, tuple[str, TensorTransform]]:
        """Target param -> (source var, inverse tensor transform): the PyTorch -> Keras
        direction."""
        return {param: (var, tensor.inverse) for var, (param, tensor) in self.params.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{v}->{p} [{t!r}]" for v, (p, t) in self.params.items())
        return f"{self.name}({inner})"


TRANSFORMS: Registry[LayerTransform] = Registry("transform")


def register(name: str) -> Callable[[type], type]:
    """Class decorator: name the layer transform and add one instance of it to ``TRANSFORMS``."""

    def deco(cls: type) -> type:
        cls.name = name
        TRANSFORMS.add(name, cls())
        return cls

    return deco


@register("conv2d")
class Conv2dTransform(LayerTransform):
    """Keras Conv2D -> torch Conv2d: kernel HWIO -> OIHW, bias as is."""

    pairs = (("Conv2D", "Conv2d"),)
    params = {"kernel": ("weight", CONV_HWIO_TO_OIHW), "bias": ("bias", IDENTITY)}


@register("depthwise_conv2d")
class DepthwiseConv2dTransform(LayerTransform):
    """Keras DepthwiseConv2D -> torch grouped Conv2d: kernel (h,w,C,mult) -> (C*mult,1,h,w)."""

    pairs = (("DepthwiseConv2D", "Conv2d"),)
    params = {"kernel": ("weight", DepthwiseToTorch()), "bias": ("bias", IDENTITY)}


@register("dense")
class DenseTransform(LayerTransform):
    """Keras Dense -> torch Linear: kernel (in, out) -> weight (out, in)."""

    pairs = (("Dense", "Linear"),)
    params = {"kernel": ("weight", DENSE_IN_OUT_TO_OUT_IN), "bias": ("bias", IDENTITY)}

    def draft_args(self, target_attrs: dict[str, Any]) -> dict[str, Any] | None:
        """Not where the Linear reads a flattened (C, H, W) map with H*W > 1 (that is
        ``dense_after_flatten``)."""
        hwc = target_attrs.get("flattened_from")
        return None if hwc and hwc[0] * hwc[1] > 1 else {}


@register("conv1x1_to_linear")
class Conv1x1ToLinearTransform(LayerTransform):
    """Keras 1x1 Conv2D -> torch Linear: kernel (1, 1, in, out) -> weight (out, in)."""

    pairs = (("Conv2D", "Linear"),)
    params = {"kernel": ("weight", Conv1x1ToLinear()), "bias": ("bias", IDENTITY)}


@register("dense_after_flatten")
class DenseAfterFlattenTransform(LayerTransform):
    """Dense fed by Flatten of an (H, W, C) map: table args ``hwc = [H, W, C]``."""

    pairs = (("Dense", "Linear"),)
    params = {"kernel": ("weight", DENSE_IN_OUT_TO_OUT_IN), "bias": ("bias", IDENTITY)}

    def draft_args(self, target_attrs: dict[str, Any]) -> dict[str, Any] | None:
        """Where the Linear reads a flattened (C, H, W) map with H*W > 1: ``hwc`` from the
        trace."""
        hwc = target_attrs.get("flattened_from")
        return {"hwc": list(hwc)} if hwc and hwc[0] * hwc[1] > 1 else None

    def apply(self, ctx: LayerContext) -> Emitted:
        hwc = ctx.args.get("hwc")
        if not hwc or len(hwc) != 3:
            raise MappingError(
                f"transform dense_after_flatten on {ctx.layer.name!r} needs args.hwc = [H, W, C]"
            )
        out = Emitted()
        self.emit(ctx, out, "kernel", "weight", FlattenNHWCToNCHW(tuple(hwc)))
        if "bias" in ctx.layer.weights:
            self.emit(ctx, out, "bias", "bias", IDENTITY)
        return out


@register("layer_norm")
class LayerNormTransform(LayerTransform):
    """Keras LayerNormalization -> torch LayerNorm: gamma -> weight, beta -> bias."""

    pairs = (("LayerNormalization", "LayerNorm"),)
    params = {"gamma": ("weight", IDENTITY), "beta": ("bias", IDENTITY)}


@register("batch_norm")
class BatchNormTransform(LayerTransform):
    """Keras BatchNormalization -> torch BatchNorm: gamma/beta (1/0 when scale/center=False),
    moving stats, num_batches_tracked = 0, and momentum p = 1 - m, eps carried per module."""

    pairs = (
        ("BatchNormalization", "BatchNorm2d"),
        ("BatchNormalization", "BatchNorm1d"),
        ("BatchNormalization", "BatchNorm3d"),
    )
    params = {
        "gamma": ("weight", IDENTITY),
        "beta": ("bias", IDENTITY),
        "moving_mean": ("running_mean", IDENTITY),
        "moving_variance": ("running_var", IDENTITY),
    }

    def apply(self, ctx: LayerContext) -> Emitted:
        layer, cfg = ctx.layer, ctx.layer.config
        if cfg.get("renorm"):
            raise UnsupportedLayerError(
                f"layer {layer.name!r} uses BatchNormalization(renorm=True), which PyTorch has no "
                "twin for; retrain or fine-tune without renorm, or convert with a custom --mapping "
                "that drops it knowingly"
            )
        axis = cfg.get("axis", -1)
        if isinstance(axis, list):
            axis = axis[0] if len(axis) == 1 else axis
        if axis not in (-1, 3, 1) or isinstance(axis, list):
            raise UnsupportedLayerError(
                f"layer {layer.name!r}: BatchNormalization axis={axis} is not a channel axis"
            )
        out = super().apply(ctx)
        n = layer.weights["moving_mean"].shape[0]
        for var, param, fill in (("gamma", "weight", 1.0), ("beta", "bias", 0.0)):
            key = f"{ctx.target}.{param}"
            if var not in layer.weights and ctx.has(key):
                out.tensors[key] = (
                    np.full((n,), fill, np.float32),
                    "",
                    f"fill {fill:g} ({'scale' if var == 'gamma' else 'center'}=False)",
                )
        nbt = f"{ctx.target}.num_batches_tracked"
        if ctx.has(nbt):
            out.tensors[nbt] = (
                np.array(0, dtype=np.int64),
                "",
                "num_batches_tracked = 0 (Keras does not count)",
            )
        if cfg.get("momentum", 0.99) is None:  # a TF1 checkpoint without it (no .meta graph)
            raise UnsupportedLayerError(
                f"layer {layer.name!r}: its BatchNorm momentum is not recorded in the source (no"
                " .meta graph with it); pass --source-bn-momentum M (the training code's BN"
                " momentum/decay, e.g. 0.99 Keras, 0.997 slim ResNet) rather than PyTorch's 0.1"
            )
        m = float(cfg.get("momentum", 0.99))
        out.bn[ctx.target] = {
            "source_layer": layer.name,
            "keras_momentum": m,
            "momentum": round(1.0 - m, 12),
            "eps": float(cfg.get("epsilon", 1e-3)),
            "center": bool(cfg.get("center", True)),
            "scale": bool(cfg.get("scale", True)),
            "config_origin": layer.config_origin,
        }
        return out


@register("layer_scale")
class LayerScaleTransform(LayerTransform):
    """Keras LayerScale gamma (C,) -> target param shaped like the target (C,) or (C,1,1)."""

    params = {"gamma": ("gamma", IDENTITY)}

    def apply(self, ctx: LayerContext) -> Emitted:
        """Table arg ``param``: the target parameter (default gamma). The source variable is
        ``gamma``, or the layer's only variable: Keras 3's ConvNeXt LayerScale adds it unnamed,
        auto-named ``variable``, ``variable_1``, ... per process."""
        out = Emitted()
        param, var = ctx.args.get("param", "gamma"), "gamma"
        if var not in ctx.layer.weights and len(ctx.layer.weights) == 1:
            (var,) = ctx.layer.weights
        key = f"{ctx.target}.{param}" if ctx.target else param
        g = ctx.var(var)
        shape = ctx.target_shapes.get(key, g.shape)
        out.tensors[key] = (
            g.reshape(shape),
            ctx.layer.keys.get(var, var),
            f"reshape {g.shape}->{tuple(shape)}",
        )
        out.consumed.add(var)
        return out


@register("separable_conv2d")
class SeparableConv2dT(LayerTransform):
    """Keras SeparableConv2D -> a module with a depthwise conv (groups=C) and a 1x1 pointwise conv:
    ``depthwise_kernel`` (h,w,C,mult) -> ``<depthwise>.weight`` (C*mult,1,h,w), ``pointwise_kernel``
    (1,1,C*mult,out) -> ``<pointwise>.weight`` (out,C*mult,1,1), ``bias`` -> ``<pointwise>.bias``
    (Keras adds it after the pointwise conv). Child names default to timm's SeparableConv2d
    (``conv1``, ``pointwise``); table args ``depthwise``/``pointwise`` name others."""

    pairs = (("SeparableConv2D", "SeparableConv2d"),)
    params = {
        "depthwise_kernel": ("conv1.weight", DepthwiseToTorch()),
        "pointwise_kernel": ("pointwise.weight", CONV_HWIO_TO_OIHW),
        "bias": ("pointwise.bias", IDENTITY),
    }

    def apply(self, ctx: LayerContext) -> Emitted:
        children = {
            "conv1": ctx.args.get("depthwise", "conv1"),
            "pointwise": ctx.args.get("pointwise", "pointwise"),
        }
        out = Emitted()
        for var, (param, tt) in self.params.items():
            if var in ctx.layer.weights:
                child, _, leaf = param.partition(".")
                self.emit(ctx, out, var, f"{children[child]}.{leaf}", tt)
        return out


@register("normalization")
class NormalizationTransform(LayerTransform):
    """Keras Normalization kept in the model (``ckptport port``): adapted ``mean``/``variance``
    -> buffers of the same names; ``count`` (how many samples adapt saw) has no use at inference
    and is consumed without a target."""

    params = {"mean": ("mean", IDENTITY), "variance": ("variance", IDENTITY)}

    def apply(self, ctx: LayerContext) -> Emitted:
        out = super().apply(ctx)
        out.consumed |= {"count"} & set(ctx.layer.weights)
        return out


class ToShape(TensorTransform):
    """Reshape ``frm`` -> ``to`` where they differ only in size-1 axes (a per-channel vector (C,)
    -> (C, 1, 1)); refuses any other shape, so no transposed matrix passes as a reshape."""

    name = "to_shape"

    def __init__(self, to: tuple[int, ...], frm: tuple[int, ...] | None = None) -> None:
        self.to, self.frm = tuple(to), None if frm is None else tuple(frm)

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if [d for d in shape if d != 1] != [d for d in self.to if d != 1]:
            raise ValueError(f"{tuple(shape)} is not {self.to} up to size-1 axes")
        return self.to

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(self.shape(x.shape))

    @property
    def inverse(self) -> TensorTransform:
        if self.frm is None:
            raise MappingError(f"{self!r}: the source shape is unknown, no inverse")
        return ToShape(self.frm, self.to)

    def __repr__(self) -> str:
        return f"reshape->{self.to}"


# more layer kinds, registered on import (last: layer_kinds builds on everything above)
from . import layer_kinds  # noqa: E402,F401
