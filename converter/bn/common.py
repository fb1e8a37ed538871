"""What the BN modules share: which modules count as BatchNorm, and the marker that tells a frozen
BN module that :func:`converter.bn.recalibrate` is running."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Set in a BN module's __dict__ while recalibrate runs, so a frozen module's pre-hook lets it train.
RECALIBRATING_ATTR = "_ckptport_bn_recalibrating"


def is_bn(module: nn.Module) -> bool:
    """True for every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm*, ...)."""
    return isinstance(module, _BatchNorm)


def is_frozen_bn_like(module: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d and look-alikes: running stats as buffers, no
    _BatchNorm."""
    return (
        not isinstance(module, nn.modules.batchnorm._NormBase)
        and "FrozenBatchNorm" in type(module).__name__
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    )


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules :func:`converter.bn.audit` checks: every ``_BatchNorm`` (BatchNorm1d/2d/3d,
    SyncBatchNorm, LazyBatchNorm*, timm's BatchNormAct2d, ...) and FrozenBatchNorm2d look-alikes."""
    return [(n, m) for n, m in model.named_modules() if is_bn(m) or is_frozen_bn_like(m)]
