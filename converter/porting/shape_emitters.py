"""Emitters for weightless layers: pooling, padding, cropping, upsampling, activations, merges,
reshapes, dropout and the preprocessing layers (kept in the module)."""

from __future__ import annotations

from .activations import ACTIVATIONS, activation_name
from .emitters import CF, CL, Emitter, Piece, Site, call, channel_dim, emitter, number, tup
from .layer_emitters import Unsupported, check_channels_last


def pool_parts(site: Site) -> tuple[tuple, tuple]:
    n = site.spatial
    kernel = tup(site.get("pool_size", 2), n)
    stride = tup(site.get("strides") or kernel, n)
    return kernel, stride


@emitter("MaxPooling1D", "MaxPooling2D", "MaxPooling3D")
class MaxPool(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride = pool_parts(site)
        n, k, s = site.spatial, kernel, stride
        short_k, short_s = (k[0] if len(set(k)) == 1 else k), (s[0] if len(set(s)) == 1 else s)
        if site.get("padding", "valid") == "valid":
            return Piece(call(f"nn.MaxPool{n}d", short_k, short_s), "{m}({x})", site.rank, CF)
        if all(v == 1 for v in s) and all(v % 2 for v in k):
            pad = k[0] // 2 if len(set(k)) == 1 else tuple(v // 2 for v in k)
            init = call(f"nn.MaxPool{n}d", short_k, 1, padding=pad)
            return Piece(init, "{m}({x})", site.rank, CF)
        expr = f'F.max_pool{n}d(pad_same({{x}}, {k}, {s}, value=float("-inf")), {k}, {s})'
        return Piece(None, expr, site.rank, CF, helpers=("pad_same",))


@emitter("AveragePooling1D", "AveragePooling2D", "AveragePooling3D")
class AvgPool(Emitter):
    """'same' average pooling leaves the padded cells out of each average, as TensorFlow does."""

    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        kernel, stride = pool_parts(site)
        n, k, s = site.spatial, kernel, stride
        short_k, short_s = (k[0] if len(set(k)) == 1 else k), (s[0] if len(set(s)) == 1 else s)
        if site.get("padding", "valid") == "valid":
            return Piece(call(f"nn.AvgPool{n}d", short_k, short_s), "{m}({x})", site.rank, CF)
        if all(v == 1 for v in s) and all(v % 2 for v in k):
            pad = k[0] // 2 if len(set(k)) == 1 else tuple(v // 2 for v in k)
            init = call(f"nn.AvgPool{n}d", short_k, 1, padding=pad, count_include_pad=False)
            return Piece(init, "{m}({x})", site.rank, CF)
        expr = f"avg_pool_same({{x}}, {k}, {s})"
        return Piece(None, expr, site.rank, CF, helpers=("pad_same", "avg_pool_same"))


@emitter(
    "GlobalAveragePooling1D",
    "GlobalAveragePooling2D",
    "GlobalAveragePooling3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
)
class GlobalPool(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        dims = tuple(range(2, site.rank))
        dims_text = str(dims[0]) if len(dims) == 1 else str(dims)
        fn = "mean" if "Average" in site.call.class_name else "amax"
        if site.get("keepdims", False):
            return Piece(None, f"{{x}}.{fn}({dims_text}, keepdim=True)", site.rank, CF)
        return Piece(None, f"{{x}}.{fn}({dims_text})", 2, CL)


@emitter("ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D")
class ZeroPad(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        pads = padding_pairs(site.get("padding", 1), site.spatial)
        flat = tuple(v for pair in reversed(pads) for v in pair)  # last dim first, as F.pad
        init = call(f"nn.ZeroPad{site.spatial}d", flat)
        return Piece(init, "{m}({x})", site.rank, CF)


def padding_pairs(value, n: int) -> list[tuple[int, int]]:
    """Keras ``padding``/``cropping``: int, (a, b) per dim, or ((before, after), ...)."""
    if isinstance(value, int):
        return [(value, value)] * n
    if n == 1 and len(value) == 2 and all(isinstance(v, int) for v in value):
        return [(int(value[0]), int(value[1]))]
    return [(v, v) if isinstance(v, int) else (int(v[0]), int(v[1])) for v in value]


@emitter("Cropping1D", "Cropping2D", "Cropping3D")
class Crop(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        crops = padding_pairs(site.get("cropping", 1), site.spatial)
        slices = [f"{a or ''}:{-b if b else ''}" for a, b in crops]
        return Piece(None, "{x}[:, :, " + ", ".join(slices) + "]", site.rank, CF)


@emitter("UpSampling2D")
class UpSample(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        check_channels_last(site)
        size = tup(site.get("size", 2), 2)
        mode = site.get("interpolation", "nearest")
        if mode not in ("nearest", "bilinear"):
            raise Unsupported(f"UpSampling2D(interpolation={mode!r})")
        init = call("nn.Upsample", scale_factor=size, mode=f'"{mode}"')
        return Piece(init, "{m}({x})", site.rank, CF)


@emitter("UpSampling1D")
class UpSample1D(Emitter):
    wants = CF

    def emit(self, site: Site) -> Piece:
        return Piece(None, f"{{x}}.repeat_interleave({int(site.get('size', 2))}, dim=2)", 3, CF)


@emitter("Activation")
class ActivationLayer(Emitter):
    def emit(self, site: Site) -> Piece:
        name = activation_name(site.get("activation"))
        if name is None:
            raise Unsupported(f"activation {site.get('activation')!r} has no PyTorch twin")
        act = ACTIVATIONS.get(name)
        layout = site.layouts[0] if site.layouts else CL
        dim = channel_dim(site.rank, layout, -1)
        if act.module is None:
            return Piece(None, act.function.format(x="{x}", dim=dim), site.rank, layout)
        return Piece(act.module.format(dim=dim), "{m}({x})", site.rank, layout, tap=False)


@emitter("ReLU")
class ReLU(Emitter):
    def emit(self, site: Site) -> Piece:
        top, slope = site.get("max_value"), float(site.get("negative_slope", 0.0))
        if float(site.get("threshold", 0.0)) != 0.0 or (top is not None and slope):
            raise Unsupported("ReLU with a threshold, or both max_value and negative_slope")
        init = "nn.ReLU()"
        if top is not None:
            init = "nn.ReLU6()" if float(top) == 6.0 else f"nn.Hardtanh(0.0, {number(top)})"
        elif slope:
            init = f"nn.LeakyReLU({number(slope)})"
        layout = site.layouts[0] if site.layouts else CL
        return Piece(init, "{m}({x})", site.rank, layout, tap=False)


@emitter("LeakyReLU", "ELU", "Softmax")
class ParamActivation(Emitter):
    def emit(self, site: Site) -> Piece:
        layout = site.layouts[0] if site.layouts else CL
        cls = site.call.class_name
        if cls == "LeakyReLU":
            slope = site.config.get("negative_slope", site.config.get("alpha", 0.3))
            init = f"nn.LeakyReLU({number(slope)})"
        elif cls == "ELU":
            init = f"nn.ELU({number(site.get('alpha', 1.0))})"
        else:
            axis = site.get("axis", -1)
            if not isinstance(axis, int):
                raise Unsupported(f"Softmax over axes {axis}")
            init = f"nn.Softmax(dim={channel_dim(site.rank, layout, axis)})"
        return Piece(init, "{m}({x})", site.rank, layout, tap=False)


OPERATORS = {"Add": " + ", "Subtract": " - ", "Multiply": " * ", "Divide": " / "}
OPERATORS["TrueDivide"] = OPERATORS["Divide"]


@emitter("Add", "Subtract", "Multiply", "Divide", "TrueDivide")
class Arithmetic(Emitter):
    """Merge layers and Keras ops on tensors and constants (``x + 3.0``)."""

    def emit(self, site: Site) -> Piece:
        n = len(site.call.inputs)
        if n != 2 and site.call.class_name not in ("Add", "Multiply"):
            raise Unsupported(f"{site.call.class_name} of {n} inputs")
        expr = OPERATORS[site.call.class_name].join(f"{{{i}}}" for i in range(n))
        layout = site.layouts[0] if site.layouts else CL
        return Piece(None, expr, max(site.ranks, default=2), layout)


@emitter("Average", "Maximum", "Minimum")
class Reduce(Emitter):
    def emit(self, site: Site) -> Piece:
        n, cls = len(site.call.inputs), site.call.class_name
        terms = [f"{{{i}}}" for i in range(n)]
        if cls == "Average":
            expr = f"({' + '.join(terms)}) / {n}"
        else:
            fn = f"torch.{cls.lower()}"
            expr = terms[0]
            for term in terms[1:]:
                expr = f"{fn}({expr}, {term})"
        layout = site.layouts[0] if site.layouts else CL
        return Piece(None, expr, site.rank, layout)


@emitter("Concatenate")
class Concatenate(Emitter):
    def emit(self, site: Site) -> Piece:
        layout = site.layouts[0] if site.layouts else CL
        dim = channel_dim(site.rank, layout, int(site.get("axis", -1)))
        return Piece(None, f"torch.cat([{{xs}}], dim={dim})", site.rank, layout)


@emitter("Flatten")
class Flatten(Emitter):
    """Keras flattens in (H, W, C) order: the writer moves channels last first."""

    wants = CL

    def emit(self, site: Site) -> Piece:
        return Piece(None, "torch.flatten({x}, 1)", 2, CL)


@emitter("Reshape")
class Reshape(Emitter):
    wants = CL

    def emit(self, site: Site) -> Piece:
        shape = tuple(int(v) for v in site.get("target_shape"))
        dims = ", ".join(str(v) for v in shape)
        if -1 in shape:
            expr = f"torch.flatten({{x}}, 1).unflatten(1, {shape})"
        else:
            expr = f"{{x}}.reshape(-1, {dims})"
        return Piece(None, expr, len(shape) + 1, CL)


@emitter("Permute")
class Permute(Emitter):
    wants = CL

    def emit(self, site: Site) -> Piece:
        dims = ", ".join(str(int(d)) for d in site.get("dims"))
        return Piece(None, f"{{x}}.permute(0, {dims})", site.rank, CL)


@emitter("Dropout")
class Dropout(Emitter):
    def emit(self, site: Site) -> Piece:
        layout = site.layouts[0] if site.layouts else CL
        init = f"nn.Dropout({number(site.get('rate', 0.5))})"
        return Piece(init, "{m}({x})", site.rank, layout, tap=False)


@emitter("SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D")
class SpatialDropout(Emitter):
    """Drops whole channels: PyTorch's Dropout1d/2d/3d on channels-first tensors."""

    wants = CF

    def emit(self, site: Site) -> Piece:
        init = f"nn.Dropout{site.rank - 2}d({number(site.get('rate', 0.5))})"
        return Piece(init, "{m}({x})", site.rank, CF, tap=False)


@emitter("Rescaling")
class Rescaling(Emitter):
    """Kept in the module: ``x * scale + offset`` (per-channel values over the last axis)."""

    def emit(self, site: Site) -> Piece:
        scale, offset = site.get("scale", 1.0), site.get("offset", 0.0)
        layout = site.layouts[0] if site.layouts else CL
        if isinstance(scale, list) or isinstance(offset, list):
            layout = CL if site.rank > 2 else layout
            scale = f"torch.tensor({scale})" if isinstance(scale, list) else number(scale)
            offset = f"torch.tensor({offset})" if isinstance(offset, list) else number(offset)
        else:
            scale, offset = number(scale), number(offset)
        expr = "{x}" + ("" if scale == "1.0" else f" * {scale}")
        if offset.startswith("-"):
            expr += f" - {offset[1:]}"
        elif offset != "0.0":
            expr += f" + {offset}"
        return Piece(None, expr, site.rank, layout)


@emitter("Normalization")
class Normalization(Emitter):
    """Kept in the module: ``(x - mean) / max(sqrt(variance), 1e-7)`` per channel."""

    wants = CF

    def emit(self, site: Site) -> Piece:
        axis = site.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if axis not in (-1, site.rank - 1) or site.get("invert", False):
            raise Unsupported(f"Normalization over axis {axis} or inverted")
        layout = CF if site.rank > 2 else CL
        if "mean" in site.weights:
            init = call("Normalization", site.weights["mean"][-1])
            return Piece(init, "{m}({x})", site.rank, layout, "normalization", classes=CLASSES)
        mean, var = _flat(site.get("mean")), _flat(site.get("variance"))
        init = call("Normalization", len(mean), mean=mean, variance=var)
        return Piece(init, "{m}({x})", site.rank, layout, classes=CLASSES)


CLASSES = ("Normalization",)


def _flat(values) -> list[float]:
    if not isinstance(values, list):
        return [float(values)]
    out: list[float] = []
    for v in values:
        out += _flat(v)
    return out
