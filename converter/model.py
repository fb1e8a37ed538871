"""Build PyTorch targets from specs and load our converted checkpoints into them."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConverterError, FrameworkMissingError, MappingError, SourceFormatError

SPEC_FORMS = "'timm:NAME', 'torchvision:NAME' or 'path/to/file.py:factory' (or 'package.module:factory')"


def _import_torch_side() -> None:
    """Import torchvision before anything imports Keras: the other order segfaults Keras builds."""
    try:
        import torchvision  # noqa: F401
    except ImportError as exc:
        raise FrameworkMissingError(f"PyTorch/torchvision is needed here: {exc}; pip install 'ckptport[torch]'") from None


def call_factory(spec: str, what: str = "model spec") -> Any:
    """Call a user's ``file.py:function`` or ``package.module:function`` (their own trusted code)."""
    mod_name, sep, fn = spec.rpartition(":")
    if not sep or not mod_name or not fn:
        raise ConverterError(f"{what} {spec!r} must look like module:function or path/to/file.py:function")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ConverterError(f"{what} {spec!r}: file {path} does not exist")
            mspec = importlib.util.spec_from_file_location(f"_ckptport_user_{path.stem}", path)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)  # the user's own code, named by them
        else:
            module = importlib.import_module(mod_name)
    except ConverterError:
        raise
    except Exception as exc:
        raise ConverterError(f"{what} {spec!r}: importing {mod_name} failed: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, fn):
        raise ConverterError(f"{what} {spec!r}: {mod_name} has no function {fn!r}")
    return getattr(module, fn)()


def build_target(spec: str, **kwargs: Any) -> Any:
    """Build a randomly initialised target model from ``timm:NAME``, ``torchvision:NAME`` or
    ``file.py:factory`` (no pretrained weights are ever downloaded)."""
    _import_torch_side()
    lib, sep, name = spec.partition(":")
    if lib == "timm" and sep:
        import timm

        if name not in timm.list_models():
            close = difflib.get_close_matches(name, timm.list_models(), n=4)
            raise ConverterError(f"timm has no model {name!r}; close: {', '.join(close) or 'none'}")
        return timm.create_model(name, pretrained=False, **kwargs)
    if lib == "torchvision" and sep:
        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=4)
            raise ConverterError(f"torchvision has no model {name!r}; close: {', '.join(close) or 'none'}")
        return torchvision.models.get_model(name, weights=None, **kwargs)
    if ":" in spec:
        model = call_factory(spec)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ConverterError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    raise ConverterError(f"model spec {spec!r} is not one of {SPEC_FORMS}")


def read_converted(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (numpy) and metadata of a checkpoint ckptport wrote."""
    from . import formats

    raw = formats.read(path)
    if raw.format not in ("safetensors", "pt"):
        raise SourceFormatError(f"{path} is a {raw.format} file, not a checkpoint ckptport wrote; convert it first")
    if "target" not in raw.metadata:
        raise SourceFormatError(
            f"{path} has no ckptport metadata (target spec, BN config); was it written by `ckptport convert`?"
        )
    return {k: t.load() for k, t in raw.tensors.items()}, dict(raw.metadata)


def apply_bn_config(model: Any, bn_config: dict[str, dict[str, Any]]) -> None:
    """Set each BN module's momentum (PyTorch convention, 1 - Keras) and eps from the recorded config."""
    modules = dict(model.named_modules())
    for name, cfg in bn_config.items():
        if name not in modules:
            raise MappingError(f"BN config names module {name!r}, which the target model does not have")
        mod = modules[name]
        mod.momentum = float(cfg["momentum"])
        mod.eps = float(cfg["eps"])


def load_model(path: str | os.PathLike, device: str = "cpu", strict: bool = True) -> Any:
    """Build the recorded target, apply the recorded surgeries and per-module BN momentum/eps, load
    the state dict strictly and return the model in eval mode."""
    _import_torch_side()
    import numpy as np
    import torch

    from .surgeries import apply_surgeries

    tensors, meta = read_converted(path)
    kwargs = json.loads(meta.get("target.kwargs", "{}"))
    model = build_target(meta["target"], **kwargs)
    apply_surgeries(model, json.loads(meta.get("surgeries", "[]")))
    apply_bn_config(model, json.loads(meta.get("bn_config", "{}")))
    sd = {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    result = model.load_state_dict(sd, strict=strict)
    if not strict and (result.missing_keys or result.unexpected_keys):
        raise MappingError(f"{path}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.eval()
    model.ckptport_metadata = meta
    return model.to(device)
