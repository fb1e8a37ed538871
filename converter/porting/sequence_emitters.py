"""Emitters for the layer kinds beyond keras.applications: transposed convolutions, Embedding,
recurrent layers (batch_first), GroupNorm and PReLU. Their weight transforms are the layer-kind
transforms (``conv_transpose2d``, ``embedding``, ``lstm``, ...)."""

from __future__ import annotations

from .emitters import CF, CL, Emitter, Piece, Site, call, emitter, number, short, tup
from .layer_emitters import (
    Unsupported,
    check_channels_last,
    conv_parts,
    conv_piece,
    with_activation,
)


@emitter("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
class ConvTranspose(Emitter):
    """torch ConvTranspose crops ``padding`` on both sides; where Keras crops more after than
    before (odd kernel, even stride, 'same'), the module crops nothing and forward slices."""

    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        try:
            from ..layer_kinds import transpose_crop, transpose_padding
        except ImportError:
            raise Unsupported("transposed convolutions need the layer-kind transforms") from None
        n = site.spatial
        axes = list(
            zip(*(tup(site.get(k, 1), n) for k in ("kernel_size", "strides", "dilation_rate")))
        )
        out_pad = site.get("output_padding")
        out_pad = tup(out_pad, n) if out_pad is not None else (None,) * n
        mode = site.get("padding", "valid")
        pads = [transpose_padding(*axis, mode, o) for axis, o in zip(axes, out_pad)]
        crops = [transpose_crop(*axis, mode, o) for axis, o in zip(axes, out_pad)]
        sliced = any(p is None for p in pads)
        padding = (0,) * n if sliced else tuple(p[0] for p in pads)
        output_padding = (0,) * n if sliced else tuple(p[1] for p in pads)
        *_, c_out, c_in = site.weights["kernel"]
        kernel, stride, dilation = (tuple(a[i] for a in axes) for i in range(3))
        init = call(
            f"nn.ConvTranspose{n}d",
            c_in,
            c_out,
            short(kernel),
            stride=short(stride) if max(stride) > 1 else None,
            padding=short(padding) if max(padding) else None,
            output_padding=short(output_padding) if max(output_padding) else None,
            dilation=short(dilation) if max(dilation) > 1 else None,
            bias=None if "bias" in site.weights else False,
        )
        inner = "{m}({x})"
        if sliced:
            inner += "[:, :, " + ", ".join(f"{b or ''}:{-a if a else ''}" for b, a in crops) + "]"
        expr, plain = with_activation(site, inner, site.rank, CF)
        args = {"cropped_in_forward": True} if sliced else {}
        return Piece(
            init, expr, site.rank, CF, f"conv_transpose{n}d", args, tap=plain and not sliced
        )


@emitter("Embedding")
class Embedding(Emitter):
    def emit(self, site: Site) -> Piece:
        vocab, dim = site.weights["embeddings"]
        init = call("nn.Embedding", vocab, dim)
        return Piece(init, "{m}({x})", site.rank + 1, CL, "embedding")


RECURRENT = {"LSTM": ("nn.LSTM", "lstm"), "GRU": ("nn.GRU", "gru"), "SimpleRNN": ("nn.RNN", "")}


@emitter("LSTM", "GRU", "SimpleRNN")
class Recurrent(Emitter):
    """batch_first recurrent layers; ``return_sequences=False`` takes the last step."""

    wants = CL

    def emit(self, site: Site) -> Piece:
        cls, cfg = site.call.class_name, site.config
        if cfg.get("return_state") or cfg.get("go_backwards") or cfg.get("stateful"):
            raise Unsupported("return_state, go_backwards and stateful are not ported yet")
        module, transform = RECURRENT[cls]
        c_in, _ = site.weights["kernel"]
        units = int(cfg["units"])
        extra = {}
        if cls == "SimpleRNN":
            transform = "simple_rnn"
            extra["nonlinearity"] = f'"{cfg.get("activation", "tanh")}"'
        elif cfg.get("activation", "tanh") != "tanh" or cfg.get(
            "recurrent_activation", "sigmoid"
        ) not in ("sigmoid",):
            raise Unsupported("non-default LSTM/GRU activations have no torch twin")
        init = call(module, c_in, units, batch_first="True", **extra)
        if cfg.get("return_sequences", False):
            return Piece(init, "{m}({x})[0]", 3, CL, transform, tap=False)
        return Piece(init, "{m}({x})[0][:, -1]", 2, CL, transform, tap=False)


@emitter("GroupNormalization")
class GroupNorm(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        axis = site.get("axis", -1)
        if axis % site.rank != site.rank - 1 or not site.weights:
            raise Unsupported("GroupNormalization over a non-channel axis or without affine")
        channels = site.weights["gamma"][0]
        init = call(
            "nn.GroupNorm", int(site.get("groups", 32)), channels, eps=number(site.get("epsilon"))
        )
        return Piece(init, "{m}({x})", site.rank, CF if site.rank > 2 else CL, "layer_norm")


@emitter("PReLU")
class PReLU(Emitter):
    """One alpha per channel (dim 1 in PyTorch), or one for all."""

    wants = CF

    def emit(self, site: Site) -> Piece:
        alpha = site.weights["alpha"]
        if sum(d > 1 for d in alpha) > 1:
            raise Unsupported("PReLU with an alpha per position (set shared_axes)")
        n = max(alpha) if alpha else 1
        layout = CF if site.rank > 2 else CL
        return Piece(call("nn.PReLU", n), "{m}({x})", site.rank, layout, "prelu")


@emitter("DepthwiseConv1D")
class DepthwiseConv1D(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride, dilation, padding, _ = conv_parts(site)
        _, channels, multiplier = site.weights["kernel"]
        init = call(
            "nn.Conv1d",
            channels,
            channels * multiplier,
            short(kernel),
            stride=short(stride) if max(stride) > 1 else None,
            padding=padding,
            dilation=short(dilation) if max(dilation) > 1 else None,
            groups=channels,
            bias=None if "bias" in site.weights else False,
        )
        return conv_piece(site, init, "depthwise_conv")
