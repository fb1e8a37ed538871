"""Build PyTorch targets from specs and load our converted checkpoints into them."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConverterError, FrameworkMissingError, MappingError, SourceFormatError

SPEC_FORMS = "'torchvision:NAME', 'timm:NAME', 'path/to/file.py:factory' or 'package.module:factory'"


def torch_side_hazard() -> bool:
    """True when TensorFlow is loaded but torchvision is not: importing torchvision now segfaults
    this stack (seen: TF 2.21 + torch 2.14 / torchvision 0.29, inside triton's native import)."""
    return sys.modules.get("tensorflow") is not None and sys.modules.get("torchvision") is None


def _import_torch_side() -> None:
    """Import torchvision before anything imports Keras: the other order segfaults."""
    if torch_side_hazard():
        raise ConverterError(
            "tensorflow was imported before torchvision in this process, and importing torchvision now "
            "would crash it (segfault on this stack); import converter.model or torchvision before "
            "tensorflow, or run this step in its own process (`ckptport verify` isolates itself)"
        )
    try:
        import torchvision  # noqa: F401  (imported for its import order, see torch_side_hazard)
    except ImportError as exc:
        raise FrameworkMissingError(f"PyTorch/torchvision is needed here: {exc}; pip install 'ckptport[torch]'") from None


def _close(name: str, names: Any) -> str:
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
    return ", ".join(close) if close else "none close"


def _load_user_module(path: Path, spec: str, what: str) -> Any:
    if not path.is_file():
        raise ConverterError(f"{what} {spec!r}: file {path} does not exist")
    mod_name = "_ckptport_spec_" + re.sub(r"\W", "_", str(path.resolve()))
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    try:
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise ConverterError(f"{what} {spec!r}: cannot import {path} as Python")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module  # dataclasses/pickle inside the file look themselves up here
        try:
            mspec.loader.exec_module(module)  # the user's own code, named by them
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    except ConverterError:
        raise
    except Exception as exc:
        raise ConverterError(f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def call_factory(spec: str, what: str = "model spec", **kwargs: Any) -> Any:
    """Call a user's ``file.py:function`` or ``package.module:function`` (their own trusted code)."""
    left, sep, fn = spec.rpartition(":")
    if not sep or not left or not fn:
        raise ConverterError(f"{what} {spec!r} must look like {SPEC_FORMS}")
    if left.endswith(".py") or os.sep in left:
        module = _load_user_module(Path(left), spec, what)
    else:
        try:
            module = importlib.import_module(left)
        except Exception as exc:
            raise ConverterError(f"{what} {spec!r}: importing {left} failed: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, fn, None)
    if not callable(factory):
        funcs = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConverterError(f"{what} {spec!r}: {left} has no function {fn!r}; functions there: {', '.join(funcs) or 'none'}")
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise ConverterError(f"{what} {spec!r}: {fn}() raised {type(exc).__name__}: {exc}") from None


def build_target(spec: str, **kwargs: Any) -> Any:
    """Build a randomly initialised target model from ``timm:NAME``, ``torchvision:NAME`` or
    ``file.py:factory`` / ``package.module:factory`` (no pretrained weights are ever downloaded:
    torchvision detection builders get ``weights_backbone=None`` too)."""
    _import_torch_side()
    import warnings

    lib, sep, name = spec.partition(":")
    if lib == "timm" and sep:
        import timm

        if not name or not timm.is_model(name):
            raise ConverterError(f"timm has no model {name!r} (spec {spec!r}); close: {_close(name, timm.list_models())}")
        builder, args = timm.create_model, {"pretrained": False}
        args_first = (name,)
    elif lib == "torchvision" and sep:
        import inspect

        import torchvision

        names = torchvision.models.list_models()
        if name not in names:
            raise ConverterError(f"torchvision has no model {name!r} (spec {spec!r}); close: {_close(name, names)}")
        builder, args, args_first = torchvision.models.get_model_builder(name), {"weights": None}, ()
        if "weights_backbone" in inspect.signature(builder).parameters:
            args["weights_backbone"] = None  # its default is a pretrained backbone: a download
    elif lib in ("keras", "tensorflow", "tf", "tf_keras", "jax", "flax"):
        raise ConverterError(f"{spec!r} names a {lib} model; a PyTorch model spec is one of {SPEC_FORMS}")
    elif ":" in spec:
        model = call_factory(spec, "model spec", **kwargs)
        import torch

        if not isinstance(model, torch.nn.Module):
            raise ConverterError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    else:
        raise ConverterError(f"model spec {spec!r} is not one of {SPEC_FORMS}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception init-weights FutureWarnings
        try:
            return builder(*args_first, **args, **kwargs)
        except Exception as exc:
            raise ConverterError(f"building {spec!r} failed: {type(exc).__name__}: {exc}") from None


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
