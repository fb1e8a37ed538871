"""The conversion pipeline: read -> resolve layers -> pick table/variant -> transform -> account."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, formats
from .formats import RawCheckpoint, RawTensor
from .errors import InvalidTensorError, MappingError, UnknownArchitectureError
from .ledger import TargetLedger, check_finite, listing
from .manifest import load_manifest, manifest_path, target_manifest_from_model
from .preprocessing import preprocessing_spec
from .source import SourceLayer, SourceModel, resolve_source
from .tables import Drop, Rule, Table, Variant, load_tables, render
from .transforms import Emitted, LayerContext

Progress = Callable[[int, int, str], None]


@dataclass
class MappedLayer:
    """One source layer a rule mapped: where it went, how, and what verification compares."""

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
    source_head: dict[str, Any] | None = None  # converter.nesting.Head.report()
    nesting: dict[str, Any] | None = None  # converter.nesting.Nesting.report(), when nested
    notes: list[str] = field(
        default_factory=list
    )  # what the user should know (training=False, ...)

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


def _covers(table: Table, source: SourceModel) -> bool:
    return all(table.match(layer.name) for layer in source.weighted)


def select(tables: list[Table], source: SourceModel, to: str | None) -> tuple[Table, Variant]:
    """The (table, variant) for this source: the first listed for it, or the one whose target is
    ``to``."""
    candidates = [
        (t, v)
        for t in tables
        for v in t.variants
        if (v.source is not None and v.source == source.manifest_id)
        or (v.source is None and _covers(t, source))
    ]
    label = f"{source.raw.path} ({source.manifest_id or 'unrecognised architecture'})"
    if not candidates:
        raise UnknownArchitectureError(
            f"{label}: no mapping table fits this source; `ckptport archs` lists the tables, "
            "--mapping FILE adds your own"
        )
    if to is None:
        return candidates[0]
    for t, v in candidates:
        if v.target == to:
            return t, v
    all_targets = sorted({v.target for t in tables for v in t.variants})
    if to not in all_targets:
        raise UnknownArchitectureError(
            f"unknown target {to!r}; targets with tables: {listing(all_targets)}"
        )
    raise UnknownArchitectureError(
        f"{label} cannot be converted to {to}; targets for this source: "
        f"{', '.join(v.target for _, v in candidates)}"
    )


def target_manifest_for(
    variant: Variant, kwargs: dict[str, Any], built: bool = False
) -> dict[str, Any]:
    """The target's keys, shapes and dtypes: the shipped manifest, or (with constructor kwargs, with
    ``built`` (surgeries that change its keys), or for a user's model) one read from the model built
    here, the variant's surgeries applied."""
    if not kwargs and not built and manifest_path(variant.target).is_file():
        return load_manifest(variant.target)
    from .model import build_target
    from .surgeries import apply_surgeries

    model = build_target(variant.target, **kwargs)
    apply_surgeries(model, variant.surgeries)
    lib, _, name = variant.target.partition(":")
    if lib not in ("timm", "torchvision"):
        lib, name = "user", variant.target
    return target_manifest_from_model(model, variant.target, lib, name, kwargs)


def convert(
    src: str | os.PathLike,
    to: str | None = None,
    *,
    mapping: str | os.PathLike | None = None,
    source_model: str | None = None,
    format: str | None = None,
    num_classes: int | None = None,
    pooling: str | None = None,
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
        pooling: ``avg``, ``max`` or ``none``: the pooling after a headless or nested base, for
            files that do not record it (TF checkpoints, SavedModels; default avg, noted).
        progress: called as ``progress(done, total, layer_name)``.
    """
    raw = formats.read(src, format)
    tables = load_tables(mapping)
    source = resolve_source(raw, tables, source_model=source_model)
    table, variant = select(tables, source, to)
    from .heads import head_plan

    table, variant, source_head = _with_source_head(source, table, variant, pooling)
    head = head_plan(table, variant, num_classes) if num_classes is not None else None
    if head and source_head.rules:  # a reset drops the user's Dense too
        head.source = re.compile(f"(?:{head.source.pattern})|{source_head.rules[0].source.pattern}")
    kwargs = {**variant.target_kwargs, **(head.target_kwargs if head else {})}
    target_manifest = _target_manifest(source, table, variant, kwargs, source_head)
    if head:
        head.surgeries = variant.surgeries + source_head.surgeries
    result = _apply(
        source,
        table,
        replace(variant, surgeries=variant.surgeries + source_head.surgeries),
        target_manifest,
        kwargs,
        head,
        progress,
    )
    result.notes = source_head.notes
    if source_head.notes:
        result.metadata["notes"] = json.dumps(source_head.notes)
    return result


def _with_source_head(
    source: SourceModel, table: Table, variant: Variant, pooling: str | None
) -> tuple[Table, Variant, Any]:
    """The table and variant for this source's own head (re-headed, headless, nested: see
    heads.source_head_plan): the plan's kwargs on the variant, its rules before the table's."""
    from .heads import source_head_plan

    plan = source_head_plan(source, table, variant, pooling)
    variant = replace(variant, target_kwargs={**variant.target_kwargs, **plan.kwargs})
    return replace(table, rules=plan.rules + table.rules), variant, plan


def _target_manifest(
    source: SourceModel, table: Table, variant: Variant, kwargs: dict[str, Any], plan: Any
) -> dict[str, Any]:
    """The target manifest with the source head's surgeries (rebuilt once more when the user's
    Dense needs the classifier resized)."""
    from .heads import classifier_resize

    surgical = replace(variant, surgeries=variant.surgeries + plan.surgeries)
    manifest = target_manifest_for(surgical, kwargs, built=bool(plan.surgeries))
    if classifier_resize(plan, source, table, manifest):
        surgical = replace(variant, surgeries=variant.surgeries + plan.surgeries)
        manifest = target_manifest_for(surgical, kwargs, built=True)
    return manifest


# ------------------------------------------------------------------ applying a table


@dataclass
class _Mapping:
    """What walking the source's layers through a table records, besides the tensors the ledger
    holds."""

    layers: list[MappedLayer] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    preprocessing_layers: list[SourceLayer] = field(default_factory=list)
    bn: dict[str, dict[str, Any]] = field(default_factory=dict)
    adjustments: list[tuple[str, str, np.ndarray, str]] = field(default_factory=list)


def _apply(
    source: SourceModel,
    table: Table,
    variant: Variant,
    target_manifest: dict[str, Any],
    kwargs: dict[str, Any],
    head: Any,
    progress: Progress | None,
) -> ConversionResult:
    """Map every source layer into the target, account for every tensor, record the provenance."""
    ledger = TargetLedger(target_manifest)
    mapping = _Mapping(dropped=[{"key": k, "why": why} for k, why in source.raw.ignored.items()])
    total = len(source.layers)
    for n, layer in enumerate(source.layers):
        if progress:
            progress(n, total, layer.name)
        _map_layer(layer, table, variant, head, ledger, mapping)
    ledger.apply_adjustments(mapping.adjustments)
    if head:
        ledger.place_fresh(head.fresh_tensors(target_manifest, kwargs), "fresh head")
    state_dict = ledger.finish(f"{source.raw.path} -> {variant.target}", table.id)
    preprocessing = preprocessing_spec(mapping.preprocessing_layers)
    result = _result(source, table, variant, kwargs, head, mapping, state_dict, preprocessing)
    if progress:
        progress(total, total, "")
    return result


def _map_layer(
    layer: SourceLayer,
    table: Table,
    variant: Variant,
    head: Any,
    ledger: TargetLedger,
    mapping: _Mapping,
) -> None:
    """One source layer: dropped with the source classifier, unmapped, dropped by the table, or
    mapped by its rule."""
    hit = table.match(layer.name)
    if head and hit and isinstance(hit[0], Rule) and head.drops(layer):
        why = f"source classifier dropped for num_classes={head.num_classes}"
        mapping.dropped += [{"key": k, "why": why} for k in layer.keys.values()]
        return
    if hit is None:
        ledger.unmapped(f"{layer.name}/{v}" for v in layer.weights)
        return
    rule, match = hit
    if isinstance(rule, Drop):
        if rule.kind == "preprocessing":
            mapping.preprocessing_layers.append(layer)
        why = f"{rule.kind}: {rule.reason or layer.class_name}"
        mapping.dropped += [{"key": k, "why": why} for k in layer.keys.values()]
        return
    if layer.weights:
        _map_by_rule(layer, rule, match, table, variant, ledger, mapping)


def _map_by_rule(
    layer: SourceLayer,
    rule: Rule,
    match: Any,
    table: Table,
    variant: Variant,
    ledger: TargetLedger,
    mapping: _Mapping,
) -> None:
    """Check the layer's tensors, run the rule's transform, place what it emits in the ledger."""
    where = f"table {table.id} rule {rule!r} on layer {layer.name!r}"
    module = render(rule.target, match, variant, where)
    fold = render(rule.fold_bias, match, variant, where) if rule.fold_bias else None
    _check_layer_tensors(layer)
    context = LayerContext(layer, module, ledger.shapes, rule.args, fold)
    emitted = rule.transform.apply(context)
    ledger.unmapped(f"{layer.name}/{v}" for v in layer.weights if v not in emitted.consumed)
    rows = _place_emitted(layer, emitted, ledger)
    mapping.adjustments += emitted.adjust
    mapping.bn.update(emitted.bn)
    tap, tap_module = _taps(rule, match, variant, where, module, layer)
    mapping.layers.append(
        MappedLayer(
            layer.name, layer.class_name, module, rule.transform.name, rows, tap, tap_module
        )
    )


def _check_layer_tensors(layer: SourceLayer) -> None:
    """Refuse NaN/inf in any variable and a negative BN moving variance."""
    for var in layer.weights:
        check_finite(layer.load(var), f"tensor {layer.keys[var]!r} (layer {layer.name}/{var})")
    if layer.class_name == "BatchNormalization" and "moving_variance" in layer.weights:
        variance = layer.load("moving_variance")
        if (variance < 0).any():
            raise InvalidTensorError(
                f"layer {layer.name!r} moving_variance has {int((variance < 0).sum())} negative "
                "values; the checkpoint is damaged"
            )


def _place_emitted(
    layer: SourceLayer, emitted: Emitted, ledger: TargetLedger
) -> list[tuple[str, str, str]]:
    """Place each emitted tensor; the (target key, source key, transform) rows of those placed."""
    rows = []
    for key, (array, source_key, how) in emitted.tensors.items():
        if ledger.place(key, array, layer.name, how):
            rows.append((key, source_key, how))
    return rows


def _taps(
    rule: Rule, match: Any, variant: Variant, where: str, module: str, layer: SourceLayer
) -> tuple[str | None, str | None]:
    """(source layer, target module) verification compares for this rule; None: not comparable."""
    tap = None
    if rule.tap is True:
        tap = layer.name
    elif isinstance(rule.tap, str):
        tap = render(rule.tap, match, variant, where)
    tap_module = (
        render(rule.tap_module, match, variant, where, target=module) if rule.tap_module else None
    )
    return tap, tap_module


def _result(
    source: SourceModel,
    table: Table,
    variant: Variant,
    kwargs: dict[str, Any],
    head: Any,
    mapping: _Mapping,
    state_dict: dict[str, np.ndarray],
    preprocessing: dict[str, Any],
) -> ConversionResult:
    surgeries = list(variant.surgeries)
    metadata = _metadata(source, table, variant, kwargs, surgeries, mapping, preprocessing)
    if head:
        metadata["head_reset"] = json.dumps(head.report(), sort_keys=True)
    return ConversionResult(
        state_dict=state_dict,
        bn_config=mapping.bn,
        preprocessing=preprocessing,
        metadata=metadata,
        layers=mapping.layers,
        dropped=mapping.dropped,
        target=variant.target,
        target_kwargs=kwargs,
        surgeries=surgeries,
        table_id=table.id,
        source_arch=source.manifest_id,
        config_origin=source.config_origin,
        head_reset=head.report() if head else None,
        source_input_shape=_input_shape(source),
        source_head=source.head.report() if source.head else None,
        nesting=source.nesting.report() if source.nesting else None,
    )


def _metadata(
    source: SourceModel,
    table: Table,
    variant: Variant,
    kwargs: dict[str, Any],
    surgeries: list[dict[str, Any]],
    mapping: _Mapping,
    preprocessing: dict[str, Any],
) -> dict[str, str]:
    """The provenance written into the output file (strings, JSON for structures)."""
    return {
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
        "bn_config": json.dumps(mapping.bn, sort_keys=True),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "dropped": json.dumps(mapping.dropped, sort_keys=True),
        "source.head": json.dumps(source.head.report() if source.head else None, sort_keys=True),
        "source.nesting": json.dumps(
            source.nesting.report() if source.nesting else None, sort_keys=True
        ),
    }


def _input_shape(source: SourceModel) -> list[int | None] | None:
    """The input size the user's own model declares (from the file's config or --source-model);
    a shipped manifest's build size is ours, not the user's, so it does not count."""
    if source.config_origin not in ("file", "model"):
        return None
    for layer in source.layers:
        if layer.class_name == "InputLayer":
            shape = layer.config.get("batch_shape") or layer.config.get("batch_input_shape")
            if shape:
                return list(shape[1:])
    return None


def dry_run(table: Table, variant: Variant, seed: int = 0) -> ConversionResult:
    """Run ``variant`` of ``table`` on synthetic tensors shaped like its source manifest, against its
    target manifest: proves the table covers every source tensor and fills every target tensor with
    the right shapes, without TensorFlow or PyTorch."""
    from .source import build_layers, skeleton_from_manifest

    if variant.source is None:
        raise MappingError(
            f"table {table.id}: variant {variant.target} has no source manifest to dry-run"
        )
    source_manifest = load_manifest(variant.source)
    raw = _synthetic_checkpoint(source_manifest, f"<dry-run {variant.source}>", seed)
    layers = build_layers(raw, skeleton_from_manifest(source_manifest), "manifest")
    source = SourceModel(raw, layers, variant.source, "manifest")
    target_manifest = load_manifest(variant.target)
    return _apply(source, table, variant, target_manifest, dict(variant.target_kwargs), None, None)


def _synthetic_checkpoint(source_manifest: dict[str, Any], name: str, seed: int) -> RawCheckpoint:
    """A TF-checkpoint-like RawCheckpoint of uniform(0.5, 1.5) tensors, one per manifest variable."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, RawTensor] = {}
    for layer in source_manifest["layers"]:
        for var in layer["vars"]:
            key = f"{layer['name']}/{var['name']}"
            shape = tuple(var["shape"])
            array = rng.uniform(0.5, 1.5, shape).astype(var["dtype"])
            tensors[key] = RawTensor(key, shape, var["dtype"], lambda a=array: a)
    return RawCheckpoint(Path(name), "tf-checkpoint", tensors, _sha256="0" * 64)
