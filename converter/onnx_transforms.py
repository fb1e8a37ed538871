"""Layer transforms for ONNX sources (registered with the others in ``TRANSFORMS``): ONNX already
stores PyTorch layouts for Conv/ConvTranspose (OIHW / IOHW) and Gemm with ``transB=1``; a Keras
export's Gemm/MatMul ``kernel`` is (in, out); the recurrent ops stack their gates in another order
than torch. BatchNormalization and LayerNormalization reuse ``batch_norm`` and ``layer_norm``:
ONNX's BN momentum has Keras' convention (``running = running * m + batch * (1 - m)``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MappingError, UnsupportedLayerError
from .transforms import (
    DENSE_IN_OUT_TO_OUT_IN,
    IDENTITY,
    Emitted,
    LayerContext,
    LayerTransform,
    TensorTransform,
    register,
)


@register("onnx_weight_bias")
class OnnxWeightBiasTransform(LayerTransform):
    """ONNX Conv/ConvTranspose/Gemm(transB=1) ``weight`` as is; a Gemm(transB=0)/MatMul
    ``kernel`` (in, out) -> weight (out, in); ``bias`` as is (or, for a conv whose BatchNorm was
    folded, into the target BN's bias when the rule says ``fold_bias``)."""

    pairs = (
        *(("Conv", f"Conv{d}d") for d in (1, 2, 3)),
        *(("ConvTranspose", f"ConvTranspose{d}d") for d in (1, 2, 3)),
        ("Gemm", "Linear"),
        ("MatMul", "Linear"),
    )
    params = {
        "weight": ("weight", IDENTITY),
        "kernel": ("weight", DENSE_IN_OUT_TO_OUT_IN),
        "bias": ("bias", IDENTITY),
    }

    def apply(self, ctx: LayerContext) -> Emitted:
        """The variables; a target bias the node does not add (an exporter drops a zero bias)
        is filled with zeros, which computes the same."""
        out = super().apply(ctx)
        key = f"{ctx.target}.bias"
        if "bias" not in ctx.layer.weights and not ctx.fold_bias and ctx.has(key):
            zeros = np.zeros(ctx.target_shapes[key], np.float32)
            out.tensors[key] = (zeros, "", "zeros (the ONNX node adds no bias)")
        return out

    def emit(self, ctx, out, var, param, tensor_transform) -> None:
        """A bias the target conv has no place for goes to ``fold_bias``'s ``bias`` (beta): the
        folded BatchNorm's shift, learnable again."""
        if var == "bias" and ctx.fold_bias and not ctx.has(f"{ctx.target}.bias"):
            out.tensors[f"{ctx.fold_bias}.bias"] = (
                ctx.var(var),
                ctx.layer.keys.get(var, var),
                f"folded conv bias -> {ctx.fold_bias}.bias",
            )
            out.consumed.add(var)
            return
        super().emit(ctx, out, var, param, tensor_transform)


@register("onnx_instance_norm")
class OnnxInstanceNormTransform(LayerTransform):
    """ONNX InstanceNormalization -> torch InstanceNorm (affine=True): scale/B -> weight/bias."""

    pairs = tuple(("InstanceNormalization", f"InstanceNorm{d}d") for d in (1, 2, 3))
    params = {"scale": ("weight", IDENTITY), "B": ("bias", IDENTITY)}


@dataclass(frozen=True, repr=False)
class GateReorder(TensorTransform):
    """Reorder the gate blocks stacked along axis 0: block ``k`` of the output is block
    ``perm[k]`` of the input (ONNX LSTM i,o,f,c -> torch i,f,g,o: perm (0, 2, 3, 1))."""

    perm: tuple[int, ...]
    label: str = ""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] % len(self.perm):
            raise MappingError(
                f"{self!r}: axis 0 of {tuple(x.shape)} is not {len(self.perm)} gates"
            )
        blocks = np.split(x, len(self.perm), axis=0)
        return np.ascontiguousarray(np.concatenate([blocks[p] for p in self.perm], axis=0))

    @property
    def inverse(self) -> TensorTransform:
        return GateReorder(tuple(int(i) for i in np.argsort(self.perm)), f"inverse of {self!r}")

    def __repr__(self) -> str:
        return self.label or f"gates{self.perm}"


class OnnxRecurrentTransform(LayerTransform):
    """ONNX LSTM/GRU/RNN (W [dirs, G*H, in], R [dirs, G*H, H], B [dirs, 2*G*H]) -> one layer of a
    torch LSTM/GRU/RNN: ``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``
    (``_reverse`` for the backward direction), gates reordered. Table arg ``layer``: k (default 0).
    """

    gates = GateReorder((0,))

    def check(self, ctx: LayerContext) -> None:
        cfg = ctx.layer.config
        if cfg.get("direction", "forward") == "reverse":
            raise UnsupportedLayerError(
                f"ONNX node {ctx.layer.name!r} runs backwards only (direction=reverse), which no"
                " torch recurrent module computes"
            )
        if "P" in ctx.layer.weights or cfg.get("clip") or cfg.get("layout", 0):
            raise UnsupportedLayerError(
                f"ONNX node {ctx.layer.name!r} uses peepholes, clip or layout=1, which torch's"
                " recurrent modules do not have"
            )

    def apply(self, ctx: LayerContext) -> Emitted:
        self.check(ctx)
        out = Emitted()
        k = int(ctx.args.get("layer", 0))
        w, r = ctx.var("W"), ctx.var("R")
        b = ctx.var("B") if "B" in ctx.layer.weights else np.zeros((w.shape[0], 2 * w.shape[1]))
        for d, suffix in enumerate(("", "_reverse")[: w.shape[0]]):
            rows = {
                f"weight_ih_l{k}{suffix}": (w[d], "W"),
                f"weight_hh_l{k}{suffix}": (r[d], "R"),
                f"bias_ih_l{k}{suffix}": (b[d][: w.shape[1]], "B"),
                f"bias_hh_l{k}{suffix}": (b[d][w.shape[1] :], "B"),
            }
            for param, (arr, var) in rows.items():
                key = f"{ctx.target}.{param}"
                how = f"direction {d}, {self.gates!r}"
                out.tensors[key] = (
                    self.gates(arr.astype(w.dtype)),
                    ctx.layer.keys.get(var, var),
                    how,
                )
        out.consumed |= {"W", "R", "B"} & set(ctx.layer.weights)
        return out


@register("onnx_lstm")
class OnnxLstmTransform(OnnxRecurrentTransform):
    """ONNX LSTM gates i,o,f,c -> torch i,f,g,o."""

    pairs = (("LSTM", "LSTM"),)
    gates = GateReorder((0, 2, 3, 1), "gates iofc->ifgo")


@register("onnx_gru")
class OnnxGruTransform(OnnxRecurrentTransform):
    """ONNX GRU gates z,r,h -> torch r,z,n; only ``linear_before_reset=1`` is torch's GRU."""

    pairs = (("GRU", "GRU"),)
    gates = GateReorder((1, 0, 2), "gates zrh->rzn")

    def check(self, ctx: LayerContext) -> None:
        super().check(ctx)
        if not ctx.layer.config.get("linear_before_reset", 0):
            raise UnsupportedLayerError(
                f"ONNX node {ctx.layer.name!r} is a GRU with linear_before_reset=0; torch's GRU"
                " applies the reset gate after the recurrent matmul (linear_before_reset=1)"
            )


@register("onnx_rnn")
class OnnxRnnTransform(OnnxRecurrentTransform):
    """ONNX RNN (one gate) -> torch RNN."""

    pairs = (("RNN", "RNN"),)
    gates = GateReorder((0,), "one gate")


# ONNX op -> the layer transform that converts it (data: which transform, not how)
OP_TRANSFORMS = {
    "Conv": "onnx_weight_bias",
    "ConvTranspose": "onnx_weight_bias",
    "Gemm": "onnx_weight_bias",
    "MatMul": "onnx_weight_bias",
    "BatchNormalization": "batch_norm",
    "LayerNormalization": "layer_norm",
    "InstanceNormalization": "onnx_instance_norm",
    "LSTM": "onnx_lstm",
    "GRU": "onnx_gru",
    "RNN": "onnx_rnn",
}
