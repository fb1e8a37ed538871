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
from typing import Any, Callable

from .errors import ConverterError, FrameworkMissingError, MappingError, SourceFormatError
from .specs import Spec, parse_spec


def torch_side_hazard() -> bool:
    """True when TensorFlow is loaded but torchvision is not: importing torchvision now segfaults
    this stack (seen: TF 2.21 + torch 2.14 / torchvision 0.29, inside triton's native import)."""
    return sys.modules.get("tensorflow") is not None and sys.modules.get("torchvision") is None


def import_torch_side(torchvision: bool = True) -> None:
    """Import the PyTorch side before anything imports Keras: torchvision after TensorFlow
    segfaults. ``torchvision=False`` (a user's own module) imports torch alone: torchvision costs
    ~170 MiB of peak RSS and ~1.5 s that such a conversion does not use, and torch alone before
    Keras is safe (tests/test_import_order.py); ``prefer_torch_first`` still imports torchvision
    before code that may import TensorFlow."""
    if torch_side_hazard():
        raise ConverterError(
            "tensorflow was imported before torchvision in this process, and importing torchvision"
            " now would crash it (segfault on this stack); import converter.model or torchvision"
            " before tensorflow, or run this step in its own process (`ckptport verify` isolates"
            " itself)"
        )
    try:
        if torchvision:
            import torchvision  # noqa: F401  (imported for its import order, see torch_side_hazard)
        else:
            import torch  # noqa: F401
    except ImportError as exc:
        raise FrameworkMissingError(
            f"PyTorch/torchvision is needed here: {exc}; pip install 'ckptport[torch]'"
        ) from None


def prefer_torch_first() -> None:
    """Before running code that may import TensorFlow (a user's Keras factory), import torchvision
    if it is installed, so that a PyTorch target can still be built in this process afterwards."""
    if sys.modules.get("tensorflow") is None and sys.modules.get("torchvision") is None:
        try:
            import torchvision  # noqa: F401  (import order, see torch_side_hazard)
        except ImportError:
            pass  # a TensorFlow-only install: nothing to protect


def _close(name: str, names: Any, lib: str) -> str:
    """``; close: a, b`` for near misses (a cutoff that keeps typos, not unrelated names), or
    where to look when nothing is close."""
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.7)
    if close:
        return f"; close: {', '.join(close)}"
    return f"; `ckptport archs` lists the targets the shipped tables convert to ({lib} has more)"


def check_spec(text: str | Spec, what: str = "--to") -> Spec:
    """The one up-front validation of a target spec (``--to``), before any source is read or
    output checked: its form, a file spec's file, a library model's name (not for the shipped
    manifests' targets, which need no import). A user's module is not imported here: that runs
    their code, which building the target does."""
    from .manifest import manifest_path

    spec = text if isinstance(text, Spec) else parse_spec(text, what)
    if spec.kind == "file" and not spec.path.expanduser().is_file():
        raise ConverterError(f"{what} {spec.text!r}: file {spec.path} does not exist")
    if spec.is_library and not manifest_path(spec.text).is_file() and not torch_side_hazard():
        try:
            _library_builder(spec)  # raises naming close matches
        except ImportError:
            pass  # no PyTorch here: building the target says so
    return spec


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
        raise ConverterError(
            f"{what} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}"
        ) from None
    return module


def call_factory(spec: str | Spec, what: str = "model spec", **kwargs: Any) -> Any:
    """Call a user's ``file.py:function`` or ``package.module:function`` (their own trusted
    code)."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec, what)
    if parsed.is_library:
        raise ConverterError(
            f"{what} {parsed.text!r} names a {parsed.kind} model, not a factory function"
        )
    module = _import_spec_module(parsed, what)
    factory = getattr(module, parsed.name, None)
    if not callable(factory):
        funcs = sorted(
            k
            for k, v in vars(module).items()
            if callable(v)
            and not k.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        raise ConverterError(
            f"{what} {parsed.text!r}: {parsed.location} has no function {parsed.name!r}; "
            f"functions there: {', '.join(funcs) or 'none'}"
        )
    try:
        return factory(**kwargs)
    except Exception as exc:
        raise ConverterError(
            f"{what} {parsed.text!r}: {parsed.name}() raised {type(exc).__name__}: {exc}"
        ) from None


def _import_spec_module(spec: Spec, what: str) -> Any:
    if spec.kind == "file":
        return _load_user_module(spec.path, spec.text, what)
    try:
        return importlib.import_module(spec.location)
    except Exception as exc:
        raise ConverterError(
            f"{what} {spec.text!r}: importing {spec.location} failed: {type(exc).__name__}: {exc}"
        ) from None


def build_target(spec: str | Spec, **kwargs: Any) -> Any:
    """Build a randomly initialised target model from ``timm:NAME``, ``torchvision:NAME`` or
    ``file.py:factory`` / ``package.module:factory`` (no pretrained weights are ever downloaded:
    torchvision detection builders get ``weights_backbone=None`` too)."""
    parsed = spec if isinstance(spec, Spec) else parse_spec(spec)
    import_torch_side(torchvision=parsed.is_library)
    if not parsed.is_library:
        return _build_user_model(parsed, kwargs)
    builder, args = _library_builder(parsed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet/inception init-weights FutureWarnings
        try:
            return builder(**args, **kwargs)
        except Exception as exc:
            raise ConverterError(
                f"building {parsed.text!r} failed: {type(exc).__name__}: {exc}"
            ) from None


def _library_builder(spec: Spec) -> tuple[Any, dict[str, Any]]:
    """The constructor of a timm/torchvision model and the arguments that keep it offline."""
    if spec.kind == "timm":
        import functools

        import timm

        if not timm.is_model(spec.name):
            raise ConverterError(
                f"timm has no model {spec.name!r} (spec {spec.text!r})"
                f"{_close(spec.name, timm.list_models(), 'timm')}"
            )
        return functools.partial(timm.create_model, spec.name), {"pretrained": False}
    import inspect

    import torchvision

    names = torchvision.models.list_models()
    if spec.name not in names:
        raise ConverterError(
            f"torchvision has no model {spec.name!r} (spec {spec.text!r})"
            f"{_close(spec.name, names, 'torchvision')}"
        )
    builder, args = torchvision.models.get_model_builder(spec.name), {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        args["weights_backbone"] = None  # its default is a pretrained backbone: a download
    return builder, args


def _build_user_model(spec: Spec, kwargs: dict[str, Any]) -> Any:
    model = call_factory(spec, "model spec", **kwargs)
    import torch

    if not isinstance(model, torch.nn.Module):
        raise ConverterError(
            f"model spec {spec.text!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def read_converted(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors (numpy) and metadata of a checkpoint ckptport wrote."""
    from . import formats

    raw = formats.read(path)
    if raw.format not in ("safetensors", "pt"):
        raise SourceFormatError(
            f"{path} is a {raw.format} file, not a checkpoint ckptport wrote; convert it first"
        )
    if "target" not in raw.metadata:
        raise SourceFormatError(
            f"{path} has no ckptport metadata (target spec, BN config); was it written by `ckptport"
            " convert`?"
        )
    return {k: t.load() for k, t in raw.tensors.items()}, dict(raw.metadata)


def apply_bn_config(model: Any, bn_config: dict[str, dict[str, Any]]) -> None:
    """Set each BN module's momentum (PyTorch convention, 1 - Keras) and eps from the recorded
    config."""
    modules = dict(model.named_modules())
    for name, cfg in bn_config.items():
        if name not in modules:
            raise MappingError(
                f"BN config names module {name!r}, which the target model does not have"
            )
        mod = modules[name]
        mod.momentum = float(cfg["momentum"])
        mod.eps = float(cfg["eps"])


def load_model(path: str | os.PathLike, device: str = "cpu") -> Any:
    """Build the recorded target, apply the recorded surgeries and per-module BN momentum/eps, load
    the state dict strictly (every key, every shape) and return the model in eval mode."""
    import numpy as np

    from .surgeries import apply_surgeries

    tensors, meta = read_converted(path)
    import_torch_side(torchvision=parse_spec(meta["target"]).is_library)
    import torch

    kwargs = json.loads(meta.get("target.kwargs", "{}"))
    surgeries = json.loads(meta.get("surgeries", "[]"))
    model = _built_empty(meta["target"], kwargs, surgeries, set(tensors))
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:  # the model's own code could not be built without real weights
        model = build_target(meta["target"], **kwargs)
        apply_surgeries(model, surgeries)
    apply_bn_config(model, json.loads(meta.get("bn_config", "{}")))
    check_fits(
        path, meta["target"], model.state_dict(), {k: tuple(v.shape) for k, v in tensors.items()}
    )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True, assign=on_meta
    )
    model.eval()
    model.ckptport_metadata = meta
    return model.to(device)


def build_on_meta(
    spec: str | Spec, prepare: Callable[[Any], Any] = lambda model: None, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, prepare(model))`` with the model built on the meta device and ``prepare`` (apply
    surgeries, trace a dummy forward pass) run there: shapes only, no memory, no weight
    initialisation (a multi-GB model in milliseconds). Where the model's code cannot run on meta
    (a factory or forward that reads tensor values: ``.item()``, numpy, data-dependent shapes),
    built and prepared the ordinary way, which raises the real error if there is one; its
    parameters' ``is_meta`` tell which."""
    import torch

    try:
        with torch.device("meta"):
            model = build_target(spec, **kwargs)
            return model, prepare(model)
    except Exception:  # noqa: BLE001 - not runnable on meta (or not at all: the real build says)
        pass
    model = build_target(spec, **kwargs)
    return model, prepare(model)


def _built_empty(target: str, kwargs: dict, surgeries: list, keys: set[str]) -> Any:
    """The target with its surgeries built on the meta device (no weight initialisation, no
    memory: every tensor comes from the file, loaded with ``assign``), when that is safe: every
    buffer and parameter is in the file and none is shared between modules (assigning would untie
    it). Otherwise (or where the model's code computes while building) an empty ``nn.Module``, and
    the caller builds it normally."""
    import torch

    from .surgeries import apply_surgeries

    try:
        with torch.device("meta"):
            model = build_target(target, **kwargs)
            apply_surgeries(model, surgeries)
    except Exception:  # noqa: BLE001 - any failure (a user's factory that reads a tensor's value
        return torch.nn.Module()  # raises a ConverterError): the ordinary build says what is wrong
    named = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    shared = len({id(t) for t in named.values()}) < len(named)
    if shared or not (set(named) | set(buffers)) <= keys:
        return torch.nn.Module()
    return model


def check_fits(
    path: Any, target: str, expected: dict[str, Any], shapes: dict[str, tuple[int, ...]]
) -> None:
    """Raise one MappingError listing missing keys, unexpected keys and shape mismatches, if any."""
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [
        f"{k} {shapes[k]} (model: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for what, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", wrong),
        )
        if items
    ]
    if problems:
        raise MappingError(
            f"{path} does not fit {target}: {'; '.join(problems)}; "
            "was the file edited, or written for another model? convert it again"
        )
