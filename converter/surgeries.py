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
            raise MappingError(f"surgery resnet_v1_stride_on_1x1: {name}.0.conv2 has stride {block.conv2.stride}, expected 2")
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
            new = cls(c.in_channels, c.out_channels, c.kernel_size, c.stride, 0, c.dilation,
                      c.groups, c.bias is not None, device=w.device, dtype=w.dtype)
            new.load_state_dict(conv.state_dict())
            setattr(parent, name, new)
            replaced += 1
    if not replaced:
        raise MappingError("surgery tf_same_padding: the model has no strided conv to re-pad")
