"""Freeze BatchNorm through ``model.train()`` (and undo it)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .common import RECALIBRATING_ATTR, is_bn

_FROZEN_ATTR = "_ckptport_bn_frozen"


def _frozen_pre_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen BN: always run in eval mode (use, never update, running
    stats)."""
    if module.training and not module.__dict__.get(RECALIBRATING_ATTR, False):
        module.training = False


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` was frozen by :func:`freeze`."""
    return _FROZEN_ATTR in module.__dict__


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm module of ``model``: running statistics and affine parameters stay
    fixed, even through ``model.train()``.

    Each BN module is put in eval mode and gets a forward pre-hook that switches it back to eval
    before every forward, so ``model.train()`` (which sets ``training=True`` on it) cannot make it
    normalize with batch statistics or update its running stats. ``weight``/``bias`` get
    ``requires_grad=False`` (their old flags are restored by :func:`unfreeze`). The hook is a
    module-level function, so frozen models survive ``copy.deepcopy`` and pickling. Idempotent;
    returns ``model``. :func:`converter.bn.recalibrate` still recomputes frozen modules' statistics.
    """
    for _, m in model.named_modules():
        if not is_bn(m) or is_frozen(m):
            continue
        flags = {
            p: getattr(m, p).requires_grad
            for p in ("weight", "bias")
            if isinstance(getattr(m, p, None), nn.Parameter)
        }
        for p in flags:
            getattr(m, p).requires_grad_(False)
        m.register_forward_pre_hook(_frozen_pre_hook)
        m.__dict__[_FROZEN_ATTR] = flags
        m.training = False
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: remove the hook, restore ``requires_grad`` and set each BN module's
    training flag to that of ``model``. Returns ``model``."""
    for _, m in model.named_modules():
        if not is_frozen(m):
            continue
        flags = m.__dict__.pop(_FROZEN_ATTR)
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _frozen_pre_hook]:
            del m._forward_pre_hooks[key]
        for p, flag in flags.items():
            param = getattr(m, p, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(flag)
        m.training = model.training
    return model
