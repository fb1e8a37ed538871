"""Named model surgeries: structural changes a target model needs before it computes what the
Keras model computed. Tables name them; ``load_model`` applies them; the output records them."""

from __future__ import annotations

from typing import Any, Callable

from .errors import MappingError
from .registry import Registry

Surgery = Callable[..., None]
SURGERIES: Registry[Surgery] = Registry("surgery")


@SURGERIES.register("resnet_v1_stride_on_1x1")
def resnet_v1_stride_on_1x1(model: Any) -> None:
    """Keras ResNet (v1) strides the first 1x1 conv of each downsampling block; torchvision/timm
    (v1.5) stride the 3x3. Move the stride: ``layerN.0.conv1`` stride 2, ``conv2`` stride 1."""
    for name in ("layer2", "layer3", "layer4"):
        block = getattr(model, name)[0]
        if tuple(block.conv2.stride) != (2, 2):
            raise MappingError(
                f"surgery resnet_v1_stride_on_1x1: {name}.0.conv2 has stride {block.conv2.stride},"
                " expected 2"
            )
        block.conv1.stride = (2, 2)
        block.conv2.stride = (1, 1)


@SURGERIES.register("set_bn_eps")
def set_bn_eps(model: Any, eps: float) -> None:
    """Set eps on every BatchNorm module (per-module values from the source are applied anyway)."""
    import torch

    for mod in model.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.eps = float(eps)


def apply_surgeries(model: Any, surgeries: list[dict[str, Any]]) -> None:
    for s in surgeries:
        SURGERIES.get(s["name"])(model, **s.get("args", {}))


def _submodule(model: Any, path: str, surgery: str) -> Any:
    modules = dict(model.named_modules())
    if path not in modules:
        raise MappingError(f"surgery {surgery}: the target model has no module {path!r}")
    return modules[path]


@SURGERIES.register("tf_same_max_pools")
def tf_same_max_pools(model: Any, modules: list[str]) -> None:
    """Keras ``MaxPooling2D(padding='same')`` pads like TF: on an even size with stride 2 it pads 0
    before and 1 after, where ``nn.MaxPool2d(3, 2, padding=1)`` pads 1 and 1 (same output size,
    windows shifted by one). Replace each named ``nn.MaxPool2d`` with timm's ``MaxPool2dSame``
    (pads -inf the TF way for the actual input size; no parameters, state dict unchanged)."""
    import torch
    from timm.layers.pool2d_same import MaxPool2dSame

    for path in modules:
        pool = _submodule(model, path, "tf_same_max_pools")
        if type(pool) is not torch.nn.MaxPool2d:
            raise MappingError(
                f"surgery tf_same_max_pools: {path!r} is a {type(pool).__name__}, not nn.MaxPool2d"
            )
        parent_path, _, leaf = path.rpartition(".")
        parent = _submodule(model, parent_path, "tf_same_max_pools") if parent_path else model
        setattr(
            parent,
            leaf,
            MaxPool2dSame(
                pool.kernel_size, pool.stride, dilation=pool.dilation, ceil_mode=pool.ceil_mode
            ),
        )


@SURGERIES.register("avg_pool_exclude_padding")
def avg_pool_exclude_padding(model: Any, consumers: list[str], kernel: int = 3) -> None:
    """Keras ``AveragePooling2D(padding='same')`` averages over the cells inside the image only;
    torch counts the padding (``count_include_pad=True``). torchvision's Inception blocks call
    ``F.avg_pool2d(x, k, 1, k // 2)`` inside ``forward``, so there is no pool module to set
    ``count_include_pad=False`` on: the surgery hooks the module consuming the pooled map
    (``branch_pool``) and divides its input by the same pool applied to ones, i.e. by the share of
    in-image cells: ``(sum / k^2) / (count / k^2) = sum / count``, exactly the excluding average.
    Valid for stride-1 'same' pools only (output size = input size)."""
    import torch
    import torch.nn.functional as F

    def rescale(module: Any, args: tuple) -> tuple:
        x = args[0]
        ones = torch.ones((1, 1, *x.shape[-2:]), dtype=x.dtype, device=x.device)
        share = F.avg_pool2d(ones, kernel, 1, kernel // 2, count_include_pad=True)
        return (x / share, *args[1:])

    for path in consumers:
        module = _submodule(model, path, "avg_pool_exclude_padding")
        if getattr(module, "_ckptport_avg_pool_exclude_padding", False):
            raise MappingError(
                f"surgery avg_pool_exclude_padding: {path!r} is rescaled already (applied twice?)"
            )
        module.register_forward_pre_hook(rescale)
        module._ckptport_avg_pool_exclude_padding = True


# ------------------------------------------------------------------ head surgeries (issue 8)


def _module(model: Any, name: str, surgery: str) -> Any:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise MappingError(f"surgery {surgery}: the target has no module {name!r}") from None


@SURGERIES.register("identity")
def identity(model: Any, modules: list[str]) -> None:
    """Replace each named module by ``nn.Identity`` (a headless target: the classifier, and the
    top layers the Keras ``include_top=False`` build does not have)."""
    import torch

    for name in modules:
        _module(model, name, "identity")
        model.set_submodule(name, torch.nn.Identity())


@SURGERIES.register("global_max_pool")
def global_max_pool(model: Any, module: str) -> None:
    """Keras ``pooling="max"`` / GlobalMaxPooling2D: the target's global average pooling module
    (``AdaptiveAvgPool2d(1)``) becomes ``AdaptiveMaxPool2d(1)``."""
    import torch

    pool = _module(model, module, "global_max_pool")
    size = getattr(pool, "output_size", None)
    if not isinstance(pool, torch.nn.AdaptiveAvgPool2d) or size not in (1, (1, 1)):
        raise MappingError(
            f"surgery global_max_pool: {module!r} is {type(pool).__name__}, not a global"
            " AdaptiveAvgPool2d(1); this target cannot take max pooling by surgery (try a timm"
            " target)"
        )
    model.set_submodule(module, torch.nn.AdaptiveMaxPool2d(1))


@SURGERIES.register("linear")
def linear(model: Any, module: str, in_features: int, out_features: int) -> None:
    """The classifier as ``nn.Linear(in_features, out_features)``: the user's Dense on a base whose
    features the target's stock classifier does not take (its top replaced by identity)."""
    import torch

    _module(model, module, "linear")
    model.set_submodule(module, torch.nn.Linear(int(in_features), int(out_features)))


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) zero padding of TF 'same' on one axis: the total is
    ``max((ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)``, the odd
    cell after (3x3, stride 2 on an even size: 0 before, 1 after, where symmetric PyTorch padding
    puts 1 on each side)."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _tf_same_conv_class() -> type:
    import torch
    import torch.nn.functional as F

    class Conv2dTFSame(torch.nn.Conv2d):
        """A Conv2d that pads like TF 'same' for the size it is given (same parameters and keys)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
            top, bottom = tf_same_pads(x.shape[-2], kh, sh, dh)
            left, right = tf_same_pads(x.shape[-1], kw, sw, dw)
            return super().forward(F.pad(x, (left, right, top, bottom)))

    return Conv2dTFSame


def _symmetric_same(conv: Any) -> bool:
    """True for the PyTorch idiom of 'same' padding, ``padding = dilation * (kernel - 1) // 2`` (odd
    kernels), zero padding mode."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return False
    dims = zip(conv.kernel_size, conv.padding, conv.dilation)
    return all(k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in dims)


@SURGERIES.register("tf_same_padding")
def tf_same_padding(model: Any) -> None:
    """Keras/TF 'same' padding on strided convolutions: every ``nn.Conv2d`` with stride > 1 and
    kernel > 1 that pads symmetrically ('same' the PyTorch way) is replaced by a Conv2d that pads
    0 before / 1 after where TF does (asymmetric, per input size). Stride-1 convs with odd kernels
    already agree with TF and are left alone; parameter names and shapes are unchanged, so the
    surgery applies before the state dict is loaded. A strided conv padded otherwise (e.g.
    'valid') is refused: TF 'same' is not what it computes."""
    import torch

    cls = _tf_same_conv_class()
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not torch.nn.Conv2d or max(conv.stride) == 1:
                continue
            if max(conv.kernel_size) == 1:
                continue
            where = f"{parent_name}.{name}" if parent_name else name
            if not _symmetric_same(conv):
                raise MappingError(
                    f"surgery tf_same_padding: {where} (stride {conv.stride}, padding "
                    f"{conv.padding}) is not padded 'same'; map it without this surgery"
                )
            c, w = conv, conv.weight
            new = cls(
                c.in_channels,
                c.out_channels,
                c.kernel_size,
                c.stride,
                0,
                c.dilation,
                c.groups,
                c.bias is not None,
                device=w.device,
                dtype=w.dtype,
            )
            new.load_state_dict(conv.state_dict())
            setattr(parent, name, new)
            replaced += 1
    if not replaced:
        raise MappingError("surgery tf_same_padding: the model has no strided conv to re-pad")
