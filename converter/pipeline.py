"""The conversion pipeline: read -> resolve layers -> pick table/variant -> transform -> account."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, formats
from .errors import (ConverterError, InvalidTensorError, MappingError, ShapeMismatchError,
                     SourceFormatError, UnknownArchitectureError)
from .manifest import load_manifest, manifest_path, target_manifest_from_model
from .source import SourceLayer, SourceModel, resolve
from .tables import Drop, Rule, Table, Variant, builtin_tables, load_table, render
from .transforms import LayerContext

Progress = Callable[[int, int, str], None]
MAX_LISTED = 12


@dataclass
class MappedLayer:
    source_layer: str
    source_class: str
    target_module: str
    transform: str
    tensors: list[tuple[str, str, str]]  # (target key, source key, tensor transform repr)
    tap: str | None  # source layer to compare with target_module, None: not comparable
    tap_module: str | None = None  # target module whose output is compared (default target_module)


@dataclass
class ConversionResult:
    """A finished conversion: the state dict (numpy, keys exactly the target's) and its provenance."""

    state_dict: dict[str, np.ndarray]
    bn_config: dict[str, dict[str, Any]]
    preprocessing: dict[str, Any]
    metadata: dict[str, str]
    layers: list[MappedLayer]
    dropped: list[dict[str, str]]
    target: str
    target_kwargs: dict[str, Any]
    surgeries: list[dict[str, Any]]
    table_id: str
    source_arch: str | None
    config_origin: str
    head_reset: dict[str, Any] | None = None
    source_input_shape: list[int | None] | None = None  # (H, W, C) when the source declares it

    def save(self, path: str | os.PathLike, format: str | None = None, force: bool = False) -> Path:
        """Write atomically (safetensors unless the name ends in .pt/.pth); refuses to overwrite."""
        return formats.write(path, self.state_dict, self.metadata, format=format, force=force)

    def torch_state_dict(self) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in self.state_dict.items()}

    @property
    def taps(self) -> list[tuple[str, str]]:
        """(source layer, target module) pairs that verification compares."""
        return [(m.tap, m.tap_module or m.target_module) for m in self.layers if m.tap]


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (f", ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _source_manifests(tables: list[Table]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for t in tables:
        for v in t.variants:
            if v.source and v.source not in seen:
                seen.add(v.source)
                try:
                    out.append(load_manifest(v.source))
                except MappingError:
                    continue  # a table for an architecture whose manifest is not shipped
    return out


def _covers(table: Table, source: SourceModel) -> bool:
    return all(table.match(lay.name) for lay in source.weighted)


def select(tables: list[Table], source: SourceModel, to: str | None) -> tuple[Table, Variant]:
    """The (table, variant) for this source: the first listed for it, or the one whose target is ``to``."""
    cands = [(t, v) for t in tables for v in t.variants
             if (v.source is not None and v.source == source.manifest_id) or (v.source is None and _covers(t, source))]
    label = f"{source.raw.path} ({source.manifest_id or 'unrecognised architecture'})"
    if not cands:
        raise UnknownArchitectureError(
            f"{label}: no mapping table fits this source; `ckptport archs` lists the tables, "
            "--mapping FILE adds your own"
        )
    if to is None:
        return cands[0]
    for t, v in cands:
        if v.target == to:
            return t, v
    all_targets = sorted({v.target for t in tables for v in t.variants})
    if to not in all_targets:
        raise UnknownArchitectureError(f"unknown target {to!r}; targets with tables: {_listing(all_targets)}")
    raise UnknownArchitectureError(
        f"{label} cannot be converted to {to}; targets for this source: {', '.join(v.target for _, v in cands)}"
    )


def _target_manifest(variant: Variant, kwargs: dict[str, Any]) -> dict[str, Any]:
    if not kwargs and manifest_path(variant.target).is_file():
        return load_manifest(variant.target)
    from .model import build_target

    model = build_target(variant.target, **kwargs)
    lib, _, name = variant.target.partition(":")
    if lib not in ("timm", "torchvision"):
        lib, name = "user", variant.target
    return target_manifest_from_model(model, variant.target, lib, name, kwargs)


def _check_finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise InvalidTensorError(f"{what} holds {bad} NaN/inf values; the checkpoint is damaged or diverged")


def preprocessing_spec(layers: list[SourceLayer]) -> dict[str, Any]:
    """Compose dropped preprocessing layers (Rescaling, Normalization) into one per-channel affine
    map ``x_torch = x * scale + offset`` applied to what the Keras model received."""
    steps: list[dict[str, Any]] = []
    scale: np.ndarray = np.ones(1, np.float64)
    offset: np.ndarray = np.zeros(1, np.float64)
    for lay in layers:
        cfg = lay.config
        if lay.class_name == "Rescaling":
            s = np.asarray(cfg.get("scale", 1.0), np.float64).reshape(-1)
            o = np.asarray(cfg.get("offset", 0.0), np.float64).reshape(-1)
            scale, offset = scale * s, offset * s + o
            steps.append({"layer": lay.name, "op": "rescale", "scale": s.tolist(), "offset": o.tolist()})
        elif lay.class_name == "Normalization":
            if "mean" in lay.weights:
                mean, var = lay.load("mean").astype(np.float64), lay.load("variance").astype(np.float64)
            else:
                mean, var = np.asarray(cfg["mean"], np.float64), np.asarray(cfg["variance"], np.float64)
            _check_finite(mean, f"layer {lay.name!r} mean")
            if (var < 0).any():
                raise InvalidTensorError(f"layer {lay.name!r} (Normalization) has a negative variance")
            std = np.maximum(np.sqrt(var.reshape(-1)), 1e-7)  # keras: max(sqrt(var), epsilon)
            mean = mean.reshape(-1)
            if cfg.get("invert"):
                raise ConverterError(f"layer {lay.name!r}: Normalization(invert=True) is not supported")
            scale, offset = scale / std, (offset - mean) / std
            steps.append({"layer": lay.name, "op": "normalize", "mean": mean.tolist(), "std": std.tolist()})
        else:
            raise MappingError(
                f"layer {lay.name!r} ({lay.class_name}) is dropped as preprocessing, but only Rescaling and "
                "Normalization can be recorded; map it or drop it with as='ignore'"
            )
    return {
        "steps": steps,
        "scale": scale.tolist(),
        "offset": offset.tolist(),
        "formula": "x_torch = x * scale + offset, per channel, on the input the Keras model received",
    }


def _check_moving_variance(layer: SourceLayer) -> None:
    if "moving_variance" in layer.weights:
        var = layer.load("moving_variance")
        if (var < 0).any():
            raise InvalidTensorError(
                f"layer {layer.name!r} moving_variance has {int((var < 0).sum())} negative values; "
                "the checkpoint is damaged"
            )


def convert(
    src: str | os.PathLike,
    to: str | None = None,
    *,
    mapping: str | os.PathLike | None = None,
    source_model: str | None = None,
    format: str | None = None,
    num_classes: int | None = None,
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert a Keras/TF checkpoint to a PyTorch state dict.

    Args:
        src: ``.keras``, ``.weights.h5``, legacy ``.h5``, TF checkpoint (prefix, ``.index`` or
            directory) or SavedModel directory.
        to: target spec such as ``timm:tf_efficientnet_b0``; default: the table's first target for
            the detected source architecture.
        mapping: a user table file (TOML) to use instead of the built-in tables.
        source_model: ``module:function`` building the Keras model (the user's own code), for files
            that store no config and match no shipped manifest.
        format: force the source format (see ``ckptport inspect``).
        num_classes: drop the source classifier and give the target a fresh head of this size,
            initialised the architecture's way.
        progress: called as ``progress(done, total, layer_name)``.
    """
    raw = formats.read(src, format)
    if raw.format in ("safetensors", "pt"):
        raise SourceFormatError(f"{raw.path} is already a PyTorch-side file ({raw.format}); give the Keras/TF source")
    tables = [load_table(mapping)] if mapping else builtin_tables()
    src_manifest = _source_model_manifest(source_model) if source_model else None
    source = resolve(raw, _source_manifests(tables), src_manifest)
    table, variant = select(tables, source, to)
    from .heads import head_plan

    head = head_plan(table, variant, num_classes) if num_classes is not None else None
    kwargs = {**variant.target_kwargs, **(head.target_kwargs if head else {})}
    tman = _target_manifest(variant, kwargs)
    return _apply(source, table, variant, tman, kwargs, head, progress)


def _source_model_manifest(spec: str) -> dict[str, Any]:
    from .manifest import source_manifest_from_model
    from .model import call_factory, prefer_torch_first

    prefer_torch_first()  # the factory imports Keras; a PyTorch target is built after it
    model = call_factory(spec, "--source-model")
    return source_manifest_from_model(model, f"model:{spec}")


def _apply(source: SourceModel, table: Table, variant: Variant, tman: dict[str, Any], kwargs: dict[str, Any],
           head: Any, progress: Progress | None) -> ConversionResult:
    shapes = {t["key"]: tuple(t["shape"]) for t in tman["tensors"]}
    dtypes = {t["key"]: t["dtype"] for t in tman["tensors"]}
    out: dict[str, np.ndarray] = {}
    filled_by: dict[str, str] = {}
    bn: dict[str, dict[str, Any]] = {}
    adjust: list[tuple[str, str, np.ndarray, str]] = []
    problems: dict[str, list[str]] = {"unmapped": [], "unexpected": [], "duplicate": [], "shape": []}
    mapped: list[MappedLayer] = []
    dropped: list[dict[str, str]] = [{"key": k, "why": why} for k, why in source.raw.ignored.items()]
    pre_layers: list[SourceLayer] = []
    total = len(source.layers)
    for n, layer in enumerate(source.layers):
        if progress:
            progress(n, total, layer.name)
        hit = table.match(layer.name)
        if head and hit and isinstance(hit[0], Rule) and head.drops(layer):
            dropped += [{"key": k, "why": f"source classifier dropped for num_classes={head.num_classes}"}
                        for k in layer.keys.values()]
            continue
        if hit is None:
            problems["unmapped"] += [f"{layer.name}/{v}" for v in layer.weights]
            continue
        rule, m = hit
        if isinstance(rule, Drop):
            if rule.kind == "preprocessing":
                pre_layers.append(layer)
            dropped += [{"key": k, "why": f"{rule.kind}: {rule.reason or layer.class_name}"} for k in layer.keys.values()]
            continue
        if not layer.weights:
            continue
        where = f"table {table.id} rule {rule!r} on layer {layer.name!r}"
        module = render(rule.target, m, variant, where)
        fold = render(rule.fold_bias, m, variant, where) if rule.fold_bias else None
        for var in layer.weights:
            _check_finite(layer.load(var), f"tensor {layer.keys[var]!r} (layer {layer.name}/{var})")
        if layer.class_name == "BatchNormalization":
            _check_moving_variance(layer)
        em = rule.transform.apply(LayerContext(layer, module, shapes, rule.args, fold))
        problems["unmapped"] += [f"{layer.name}/{v}" for v in layer.weights if v not in em.consumed]
        rows = []
        for key, (arr, skey, why) in em.tensors.items():
            if key not in shapes:
                problems["unexpected"].append(f"{key} (from {layer.name})")
                continue
            if key in out:
                problems["duplicate"].append(f"{key} (from {filled_by[key]} and {layer.name})")
                continue
            if tuple(arr.shape) != shapes[key]:
                problems["shape"].append(f"{key}: {layer.name} gives {tuple(arr.shape)} after {why}, target expects {shapes[key]}")
                continue
            out[key] = arr.astype(dtypes[key], copy=False)
            filled_by[key] = layer.name
            rows.append((key, skey, why))
        adjust += em.adjust
        bn.update(em.bn)
        tap = None
        if rule.tap is True:
            tap = layer.name
        elif isinstance(rule.tap, str):
            tap = render(rule.tap, m, variant, where)
        tap_module = render(rule.tap_module, m, variant, where, target=module) if rule.tap_module else None
        mapped.append(MappedLayer(layer.name, layer.class_name, module, rule.transform.name, rows, tap, tap_module))
    for key, op, arr, why in adjust:
        if key not in out:
            problems["unexpected"].append(f"{key} (bias fold target: {why})")
            continue
        out[key] = (out[key].astype(np.float64) - arr.astype(np.float64)).astype(out[key].dtype)
    if head:
        out.update(head.fresh_tensors(tman, kwargs))
        for k in head.fresh_keys:
            filled_by[k] = "fresh head"
    if problems["shape"]:  # the root cause: report it before the unfilled keys it leaves behind
        raise ShapeMismatchError(
            f"{source.raw.path} -> {variant.target}: shape mismatch: {_listing(problems['shape'])}; "
            "is the source the same architecture/width as the target?"
        )
    missing = [k for k in shapes if k not in out]
    msgs = []
    if problems["unmapped"]:
        msgs.append(f"{len(problems['unmapped'])} source tensors mapped by no rule: {_listing(problems['unmapped'])}")
    if missing:
        msgs.append(f"{len(missing)} target tensors left unfilled: {_listing(missing)}")
    if problems["unexpected"]:
        msgs.append(f"rules produce keys the target does not have: {_listing(problems['unexpected'])}")
    if problems["duplicate"]:
        msgs.append(f"target keys filled twice: {_listing(problems['duplicate'])}")
    if msgs:
        raise MappingError(f"{source.raw.path} -> {variant.target} (table {table.id}): " + "; ".join(msgs))
    for key, arr in out.items():
        _check_finite(arr, f"target tensor {key!r} (from {filled_by.get(key)})")
    ordered = {k: out[k] for k in shapes}
    pre = preprocessing_spec(pre_layers)
    surgeries = list(variant.surgeries)
    meta = {
        "ckptport.version": __version__,
        "ckptport.format": "1",
        "source.file": source.raw.path.name,
        "source.sha256": source.raw.sha256,
        "source.format": source.raw.format,
        "source.arch": source.manifest_id or "",
        "source.config_origin": source.config_origin,
        "table.id": table.id,
        "table.version": str(table.version),
        "target": variant.target,
        "target.kwargs": json.dumps(kwargs, sort_keys=True),
        "surgeries": json.dumps(surgeries, sort_keys=True),
        "bn_config": json.dumps(bn, sort_keys=True),
        "preprocessing": json.dumps(pre, sort_keys=True),
        "dropped": json.dumps(dropped, sort_keys=True),
    }
    if head:
        meta["head_reset"] = json.dumps(head.report(), sort_keys=True)
    if progress:
        progress(total, total, "")
    return ConversionResult(ordered, bn, pre, meta, mapped, dropped, variant.target, kwargs, surgeries,
                            table.id, source.manifest_id, source.config_origin,
                            head.report() if head else None, _input_shape(source))


def _input_shape(source: SourceModel) -> list[int | None] | None:
    """The input size the user's own model declares (from the file's config or --source-model);
    a shipped manifest's build size is ours, not the user's, so it does not count."""
    if source.config_origin not in ("file", "model"):
        return None
    for lay in source.layers:
        if lay.class_name == "InputLayer":
            shape = lay.config.get("batch_shape") or lay.config.get("batch_input_shape")
            if shape:
                return list(shape[1:])
    return None


def dry_run(table: Table, variant: Variant, seed: int = 0) -> ConversionResult:
    """Run ``variant`` of ``table`` on synthetic tensors shaped like its source manifest, against its
    target manifest: proves the table covers every source tensor and fills every target tensor with
    the right shapes, without TensorFlow or PyTorch."""
    from .formats import RawCheckpoint, RawTensor
    from .source import SourceModel, build_layers, skeleton_from_manifest

    if variant.source is None:
        raise MappingError(f"table {table.id}: variant {variant.target} has no source manifest to dry-run")
    man = load_manifest(variant.source)
    rng = np.random.default_rng(seed)
    tensors: dict[str, RawTensor] = {}
    for lay in man["layers"]:
        for v in lay["vars"]:
            key = f"{lay['name']}/{v['name']}"
            shape = tuple(v["shape"])
            arr = rng.uniform(0.5, 1.5, shape).astype(v["dtype"] if v["dtype"] != "int64" else "int64")
            tensors[key] = RawTensor(key, shape, v["dtype"], lambda a=arr: a)
    raw = RawCheckpoint(Path(f"<dry-run {variant.source}>"), "tf-checkpoint", tensors, _sha256="0" * 64)
    layers = build_layers(raw, skeleton_from_manifest(man), "manifest")
    source = SourceModel(raw, layers, variant.source, "manifest")
    return _apply(source, table, variant, load_manifest(variant.target), dict(variant.target_kwargs), None, None)
