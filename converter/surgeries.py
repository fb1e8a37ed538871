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
