"""The conversion pipeline: read -> resolve layers -> pick table/variant -> transform -> account."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from . import __version__, formats
from .formats import RawCheckpoint, RawTensor, check_output
from .formats.direct_io import check_mode
from .errors import InvalidTensorError, MappingError, UnknownArchitectureError
from .ledger import SPILL_BYTES, Sink, Spilled, TargetLedger, check_finite, listing
from .manifest import load_manifest, manifest_path, target_manifest_from_model
from .refusals import refusal_for
from .preprocessing import preprocessing_spec
from .specs import looks_like_spec, parse_spec, same_spec
from .source import SourceLayer, SourceModel, fill_bn_momentum, resolve_source
from .tables import Drop, Rule, Table, Variant, load_tables, render
from .transforms import Emitted, LayerContext

if TYPE_CHECKING:
    from .batch import StructureCache
    from .heads import HeadPlan

Progress = Callable[[int, int, str], None]
OpenSink = Callable[[dict[str, Any]], Sink]  # target manifest -> where large tensors stream to


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
    """A finished conversion: the state dict (numpy, keys exactly the target's) and its
    provenance."""

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
    source_input: dict[str, Any] | None = None  # its dtype and, for token ids, the vocabulary size
    source_path: Path | None = None  # never written over: save() refuses it as an output
    source_head: dict[str, Any] | None = None  # converter.nesting.Head.report()
    nesting: dict[str, Any] | None = None  # converter.nesting.Nesting.report(), when nested
    notes: list[str] = field(
        default_factory=list
    )  # what the user should know (training=False, ...)
    drafted: Any = None  # converter.drafting.Draft when no table fitted and one was drafted

    def save(self, path: str | os.PathLike, format: str | None = None, force: bool = False) -> Path:
        """Write atomically (safetensors unless the name ends in .pt/.pth); refuses to overwrite."""
        inputs = (self.source_path,) if self.source_path else ()
        return formats.write(
            path, self.state_dict, self.metadata, format=format, force=force, inputs=inputs
        )

    def torch_state_dict(self) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v)) for k, v in self.state_dict.items()}

    @property
    def taps(self) -> list[tuple[str, str]]:
        """(source layer, target module) pairs that verification compares."""
        return [(m.tap, m.tap_module or m.target_module) for m in self.layers if m.tap]


def _covers(table: Table, source: SourceModel) -> bool:
    return all(table.match(layer.name) for layer in source.weighted)


def check_shadowed_rules(table: Table, source: SourceModel) -> None:
    """A rule that matches weighted layers of this source but maps none of them (an earlier rule
    takes each) never applies: an error naming both rules, not a silent skip. (Specific rules
    before a generic one that still maps other layers are fine.)"""
    names = [lay.name for lay in source.weighted]
    for j, rule in enumerate(table.rules):
        hits = [n for n in names if rule.source.fullmatch(n)]
        earlier = {
            n: next((r for r in table.rules[:j] if r.source.fullmatch(n)), None) for n in hits
        }
        if hits and all(earlier.values()):
            first = earlier[hits[0]]
            raise MappingError(
                f"table {table.id}: rule {rule!r} matches layer {hits[0]!r}, which rule {first!r}"
                " already maps (the first matching rule wins), so it never applies; narrow the"
                " earlier rule's pattern or put the specific rule first"
            )


def _closest_table(tables: list[Table], source: SourceModel) -> str:
    """Why no table fits: the table whose rules match the most weighted layers, and what differs."""
    names = [lay.name for lay in source.weighted]
    if not tables or not names:
        return "the source has no weighted layers" if tables else "no tables loaded"
    scored = [(sum(t.match(n) is not None for n in names), -k, t) for k, t in enumerate(tables)]
    hits, _, best = max(scored, key=lambda s: s[:2])
    if hits == 0:
        return f"no table's rules match any of its {len(names)} weighted layers: {listing(names)}"
    if 2 * hits < len(names):
        return (
            f"a custom model: no shipped table maps most of its {len(names)} weighted layers"
            f" (closest: {best.id}, {hits} of them)"
        )
    missing = [n for n in names if best.match(n) is None]
    why = f"closest: table {best.id}, whose rules match {hits} of {len(names)} weighted layers"
    if missing:
        return f"{why}; no rule for {listing(missing)}"
    sources = sorted({v.source for v in best.variants if v.source})
    got = source.manifest_id or "an unrecognised architecture"
    return f"{why}, but its variants are for {listing(sources)} and this source is {got}"


def select(tables: list[Table], source: SourceModel, to: str | None) -> tuple[Table, Variant]:
    """The (table, variant) for this source: the first listed for it, or the one whose target is
    ``to``."""
    candidates = [
        (t, v)
        for t in tables
        for v in t.variants
        if (
            (v.source is not None and v.source == source.manifest_id)
            or (v.source is None and _covers(t, source))
        )
        and v.fits(source)
    ]
    label = f"{source.raw.path} ({source.manifest_id or 'unrecognised architecture'})"
    refusal = refusal_for(source.manifest_id)
    if not candidates and refusal:
        shape = source.structure
        label = f"{source.raw.path} ({source.manifest_id}{': ' + shape if shape else ''})"
        raise UnknownArchitectureError(refusal.message(label))
    if not candidates:
        raise UnknownArchitectureError(
            f"{label}: no mapping table fits this source ({_why_no_table(source, tables)}); "
            "`--to path/to/model.py:factory` drafts a mapping onto your own PyTorch module "
            "(`ckptport draft` writes only the table), --mapping FILE uses your own table, "
            "`ckptport archs` lists the shipped ones"
        )
    if to is None:
        return candidates[0]
    for t, v in candidates:
        if same_spec(v.target, to):
            return t, v
    all_targets = sorted({v.target for t in tables for v in t.variants})
    if not any(same_spec(t, to) for t in all_targets):
        parse_spec(to, "--to")  # a malformed or non-PyTorch spec says so first
        raise UnknownArchitectureError(
            f"no table converts to {to!r}; targets for {label}: "
            f"{', '.join(v.target for _, v in candidates)} (all targets: {listing(all_targets)}); "
            "for your own module use --to file.py:factory (drafts a mapping) or --mapping"
        )
    raise UnknownArchitectureError(
        f"{label} cannot be converted to {to}; targets for this source: "
        f"{', '.join(v.target for _, v in candidates)}"
    )


def _why_no_table(source: SourceModel, tables: list[Table]) -> str:
    """Why ``select`` found no table: the source is no shipped architecture, or no table lists
    the one it is, or the user's table's rules do not cover its layers."""
    if source.manifest_id:
        return f"it is {source.manifest_id}, which no table here converts"
    return _closest_table(tables, source)


def _select_or_draft(
    tables: list[Table], source: SourceModel, to: str | None, mapping: Any
) -> tuple[Table, Variant, Any]:
    """``select``'s table and variant; when none fits and ``to`` is the user's own module (a
    ``file.py:factory`` or ``module:factory`` spec) and no --mapping was given, a table drafted
    from the structure of both (converter/drafting), returned as the third item."""
    try:
        return (*select(tables, source, to), None)
    except UnknownArchitectureError:
        if mapping is not None or to is None or not looks_like_spec(to):
            raise
        if parse_spec(to).is_library:
            raise
    from .drafting import draft_for_source

    drafted = draft_for_source(source, to)
    table = drafted.table()
    return table, table.variants[0], drafted


def target_manifest_for(
    variant: Variant, kwargs: dict[str, Any], built: bool = False
) -> dict[str, Any]:
    """The target's keys, shapes and dtypes: the shipped manifest, or (with constructor kwargs, with
    ``built`` (surgeries that change its keys), or for a user's model) one read from the model built
    here, the variant's surgeries applied."""
    if not kwargs and not built and manifest_path(variant.target).is_file():
        return load_manifest(variant.target)
    model = _shape_only_target(variant, kwargs)
    lib, _, name = variant.target.partition(":")
    if lib not in ("timm", "torchvision"):
        lib, name = "user", variant.target
    return target_manifest_from_model(model, variant.target, lib, name, kwargs)


def _shape_only_target(variant: Variant, kwargs: dict[str, Any]) -> Any:
    """The target with its surgeries, for its keys, shapes and BN settings only: built on the meta
    device (no memory, no weight initialisation: a 350M-parameter model in milliseconds), or
    normally where the model's code cannot be built there (model.build_on_meta)."""
    from .model import build_on_meta
    from .surgeries import apply_surgeries

    surgeries = variant.surgeries
    return build_on_meta(variant.target, lambda m: apply_surgeries(m, surgeries), **kwargs)[0]


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
    use_ema: bool = False,
    source_bn_momentum: float | None = None,
    accept_folded_bn: bool = False,
    sink: OpenSink | None = None,
    structures: StructureCache | None = None,
) -> ConversionResult:
    """Convert a Keras/TF checkpoint (or an ONNX model) to a PyTorch state dict.

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
        use_ema: take a TF1 checkpoint's ExponentialMovingAverage shadow values.
        source_bn_momentum: the source's BatchNorm momentum where the file does not record it
            (TF1 checkpoints without a ``.meta`` graph).
        accept_folded_bn: ONNX only: convert BN folded by the exporter with identity BN stats.
        sink: given the target manifest, where large tensors go as they are converted (a file
            being written: :func:`convert_file`); the state dict then holds ``Spilled`` markers
            for them.
        structures: a ``converter.batch.StructureCache``: resolution, table choice and target
            manifest once per source structure, reused for its next files (the same bytes).
    """
    if to is not None:
        from .model import check_spec

        check_spec(to)  # a bad --to names itself before the source is read
    if (format or formats.sniff(src)) == "onnx":  # converter.onnx_source
        return _convert_onnx(src, to, mapping, num_classes, accept_folded_bn, progress, sink)
    tables = load_tables(mapping)
    source = _read_source(
        src, format, tables, source_model, use_ema, source_bn_momentum, structures
    )
    with source.raw.hashing_stopped_on_error():
        pick = partial(_select_or_draft, tables, source, to, mapping)
        table, variant, drafted = _once(structures, source, ("select", to), pick)
        check_shadowed_rules(table, source)
        selected = (source, table, variant, num_classes, pooling, progress, sink, structures)
        result = _convert_selected(*selected)
    result.drafted = drafted
    return result


def convert_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    to: str | None = None,
    *,
    force: bool = False,
    format: str | None = None,
    output_io: str = "auto",
    **options: Any,
) -> tuple[ConversionResult, Path]:
    """Convert ``src`` and write the result to ``out``: what ``ckptport convert`` does for each
    file. A safetensors output is streamed: each large tensor is written to its place in the file
    as it is converted, so memory holds one layer's tensors, not the whole state dict, and the
    bytes are those ``convert(...).save(out)`` writes. ``options``: those of :func:`convert`.
    Returns the result (its ``state_dict`` reads the written file) and the path written; a
    drafted table is written beside the output first. Many files: pass the same
    ``structures=StructureCache()`` to each (see :func:`convert`). ``output_io``: how a
    safetensors output is written, ``direct`` (around the page cache), ``buffered`` or ``auto``
    (formats.direct_io.choose)."""
    out = check_output(out, force, (src,))
    check_mode(output_io)  # refused before the source is read
    if formats.output_format_for(out, None) != "safetensors":
        result = convert(src, to, format=format, **options)
        _write_drafted(result, out, force)
        return result, result.save(out, force=force)
    with formats.atomic_output(out, force, (src,)) as tmp:
        streams: list[Any] = []

        def open_sink(target_manifest: dict[str, Any]) -> Sink:
            streams.append(formats.stream_writer(tmp, target_manifest, output_io))
            return streams[-1]

        try:
            result = convert(src, to, format=format, sink=open_sink, **options)
            _finish_stream(result, streams[-1])
        finally:
            for stream in streams:
                stream.close()
        _write_drafted(result, out, force)
    result.state_dict = formats.FileTensors(out, "safetensors")
    return result, out


def _finish_stream(result: ConversionResult, stream: Any) -> None:
    """Write the tensors still in memory (the small ones: every tensor went through the ledger,
    at the target manifest's dtype and shape, so each has its planned place) and the header."""
    for key, array in result.state_dict.items():
        if not isinstance(array, Spilled):
            stream.put(key, array)
    stream.finish(result.metadata)


def _write_drafted(result: ConversionResult, out: Path, force: bool) -> None:
    if result.drafted is not None:  # before the output: a refused table leaves no output either
        result.drafted.write(drafted_table_path(out), force=force)


def drafted_table_path(out: Path) -> Path:
    """Where a drafted table goes: beside the output, ``model.safetensors`` ->
    ``model.mapping.toml``."""
    return out.with_name(out.name.split(".")[0] + ".mapping.toml")


def _convert_onnx(src, to, mapping, num_classes, accept_folded_bn, progress, sink):
    from .onnx_source import convert_onnx

    options = dict(mapping=mapping, num_classes=num_classes, accept_folded_bn=accept_folded_bn)
    raw = formats.read(src, "onnx")
    raw.start_hashing()
    with raw.hashing_stopped_on_error():
        return convert_onnx(raw, to, progress=progress, sink=sink, **options)


def _convert_selected(
    source: SourceModel,
    table: Table,
    variant: Variant,
    num_classes: int | None,
    pooling: str | None,
    progress: Progress | None,
    sink: OpenSink | None = None,
    structures: StructureCache | None = None,
) -> ConversionResult:
    """The conversion once the table and variant are chosen: the source's own head and any head
    reset planned, the target manifest built, every layer mapped, notes recorded."""
    from .heads import head_plan

    table, variant, source_head = _with_source_head(source, table, variant, pooling)
    head = head_plan(table, variant, num_classes) if num_classes is not None else None
    if head and source_head.rules:  # a reset drops the user's Dense too
        head.source = re.compile(f"(?:{head.source.pattern})|{source_head.rules[0].source.pattern}")
    kwargs = {**variant.target_kwargs, **(head.target_kwargs if head else {})}
    target_manifest = _target_manifest(source, table, variant, kwargs, source_head, structures)
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
        sink,
    )
    result.notes = source.notes + source_head.notes + result.notes
    if result.notes:
        result.metadata["notes"] = json.dumps(result.notes)
    return result


def _read_source(
    src: str | os.PathLike,
    format: str | None,
    tables: list[Table],
    source_model: str | None,
    use_ema: bool,
    source_bn_momentum: float | None,
    structures: StructureCache | None = None,
) -> SourceModel:
    """Read and resolve the source; EMA shadows and the user's BN momentum applied (with
    ``structures``: resolved once per structure, see converter.batch)."""
    raw = formats.read(src, format)
    raw.start_hashing()
    with raw.hashing_stopped_on_error():
        return _resolved_source(raw, tables, source_model, use_ema, source_bn_momentum, structures)


def _resolved_source(raw, tables, source_model, use_ema, source_bn_momentum, structures):
    """``_read_source``'s steps after the read (the hash running beside them)."""
    if use_ema:
        from .formats.tf1 import use_shadows

        use_shadows(raw)

    def resolved(raw: RawCheckpoint) -> SourceModel:
        source = resolve_source(raw, tables, source_model=source_model)
        if source_bn_momentum is not None:
            fill_bn_momentum(source, source_bn_momentum)
        return source

    if structures is None:
        return resolved(raw)
    context = ([(t.id, t.version) for t in tables], source_model, source_bn_momentum)
    return structures.source(raw, resolved, context)


def _once(structures: StructureCache | None, source: SourceModel, step: Any, compute: Callable):
    """``compute()``, or with ``structures`` its value for ``source``'s structure and ``step``,
    computed for the first file of that structure."""
    return compute() if structures is None else structures.once(source, step, compute)


def _with_source_head(
    source: SourceModel, table: Table, variant: Variant, pooling: str | None
) -> tuple[Table, Variant, Any]:
    """The table and variant for this source's own head (re-headed, headless, nested: see
    heads.source_head_plan): the plan's kwargs on the variant, its rules before the table's."""
    from .heads import source_head_plan

    plan = source_head_plan(source, table, variant, pooling)
    variant = replace(variant, target_kwargs={**variant.target_kwargs, **plan.kwargs})
    return replace(table, rules=plan.rules + table.rules), variant, plan


def recorded_target_manifest(table: Table, variant: Variant) -> dict[str, Any] | None:
    """The manifest a drafted table recorded for the user's module ``variant.target``, while the
    module's file is byte for byte the one drafted from (else None: the module is built)."""
    record = table.target_record
    if record is None or not same_spec(record["target"], variant.target):
        return None
    spec = parse_spec(variant.target)
    if spec.kind != "file" or not spec.path.is_file():
        return None
    return record["manifest"] if formats.sha256_path(spec.path) == record["sha256"] else None


def _target_manifest(
    source: SourceModel,
    table: Table,
    variant: Variant,
    kwargs: dict[str, Any],
    plan: Any,
    structures: StructureCache | None = None,
) -> dict[str, Any]:
    """The target manifest with the source head's surgeries (rebuilt once more when the user's
    Dense needs the classifier resized); with ``structures``, built once per structure."""
    from .heads import classifier_resize

    recorded = recorded_target_manifest(table, variant)
    if recorded is not None and not kwargs and not plan.surgeries:
        return recorded

    def manifest_for(surgical: Variant, built: bool) -> dict[str, Any]:
        step = ["target manifest", surgical.target, kwargs, surgical.surgeries, built]
        step = json.dumps(step, sort_keys=True, default=str)
        compute = partial(target_manifest_for, surgical, kwargs, built)
        return _once(structures, source, step, compute)

    surgical = replace(variant, surgeries=variant.surgeries + plan.surgeries)
    manifest = manifest_for(surgical, bool(plan.surgeries))
    if classifier_resize(plan, source, table, manifest):
        surgical = replace(variant, surgeries=variant.surgeries + plan.surgeries)
        manifest = manifest_for(surgical, True)
    return manifest


# ------------------------------------------------------------------ applying a table


@dataclass
class _TableWalk:
    """One pass of a table over the source's layers: fills the ledger with what the rules emit and
    keeps the records a result needs (mapped layers, dropped keys, preprocessing layers, BN
    settings, bias folds)."""

    table: Table
    variant: Variant
    head: HeadPlan | None
    ledger: TargetLedger
    layers: list[MappedLayer] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)
    preprocessing_layers: list[SourceLayer] = field(default_factory=list)
    bn: dict[str, dict[str, Any]] = field(default_factory=dict)
    adjustments: list[tuple[str, str, np.ndarray, str]] = field(default_factory=list)

    def visit(self, layer: SourceLayer) -> None:
        """One source layer: dropped with the source classifier, unmapped, dropped by the table,
        or mapped by its rule."""
        hit = self.table.match(layer.name)
        if self.head and hit and isinstance(hit[0], Rule) and self.head.drops(layer):
            self._drop(layer, f"source classifier dropped for num_classes={self.head.num_classes}")
            return
        if hit is None:
            self.ledger.unmapped(f"{layer.name}/{v}" for v in layer.weights)
            return
        rule, match = hit
        if isinstance(rule, Drop):
            if rule.kind == "preprocessing":
                self.preprocessing_layers.append(layer)
            self._drop(layer, f"{rule.kind}: {rule.reason or layer.class_name}")
        elif layer.weights:
            with layer.held():
                self._map_by_rule(layer, rule, match)

    def _drop(self, layer: SourceLayer, why: str) -> None:
        self.dropped += [{"key": key, "why": why} for key in layer.keys.values()]

    def _map_by_rule(self, layer: SourceLayer, rule: Rule, match: re.Match[str]) -> None:
        """Check the layer's tensors, run the rule's transform, place what it emits."""
        where = f"table {self.table.id} rule {rule!r} on layer {layer.name!r}"
        module = render(rule.target, match, self.variant, where)
        fold = render(rule.fold_bias, match, self.variant, where) if rule.fold_bias else None
        _check_layer_tensors(layer, streaming=self.ledger.sink is not None)
        emitted = rule.transform.apply(
            LayerContext(layer, module, self.ledger.shapes, rule.args, fold)
        )
        reads = ", ".join(rule.transform.params) or "its own variables"
        self.ledger.unmapped(
            f"{layer.name}/{v} (rule {rule!r} matched the layer; {rule.transform.name} reads"
            f" {reads})"
            for v in layer.weights
            if v not in emitted.consumed
        )
        rows = self._place(layer, emitted)
        self.adjustments += emitted.adjust
        self.bn.update(emitted.bn)
        tap, tap_module = self._taps(layer, rule, match, where, module)
        transform = rule.transform.name
        self.layers.append(
            MappedLayer(layer.name, layer.class_name, module, transform, rows, tap, tap_module)
        )

    def _place(self, layer: SourceLayer, emitted: Emitted) -> list[tuple[str, str, str]]:
        """Place each emitted tensor; the (target key, source key, transform) rows of those
        placed."""
        rows = []
        for key, (array, source_key, how) in emitted.tensors.items():
            if self.ledger.place(key, array, layer.name, how):
                rows.append((key, source_key, how))
        return rows

    def _taps(
        self, layer: SourceLayer, rule: Rule, match: re.Match[str], where: str, module: str
    ) -> tuple[str | None, str | None]:
        """(source layer, target module) verification compares; None: not comparable."""
        tap = None
        if rule.tap is True:
            tap = layer.name
        elif isinstance(rule.tap, str):
            tap = render(rule.tap, match, self.variant, where)
        if not rule.tap_module:
            return tap, None
        return tap, render(rule.tap_module, match, self.variant, where, target=module)


def _apply(
    source: SourceModel,
    table: Table,
    variant: Variant,
    target_manifest: dict[str, Any],
    kwargs: dict[str, Any],
    head: HeadPlan | None,
    progress: Progress | None,
    sink: OpenSink | None = None,
) -> ConversionResult:
    """Map every source layer into the target, account for every tensor, record the provenance."""
    ledger = TargetLedger(target_manifest, sink(target_manifest) if sink else None)
    walk = _TableWalk(table, variant, head, ledger)
    walk.dropped = [{"key": key, "why": why} for key, why in source.raw.ignored.items()]
    total = len(source.layers)
    for n, layer in enumerate(source.layers):
        if progress:
            progress(n, total, layer.name)
        walk.visit(layer)
    walk.ledger.apply_adjustments(walk.adjustments)
    if head:
        walk.ledger.place_fresh(head.fresh_tensors(target_manifest, kwargs), "fresh head")
    state_dict = walk.ledger.finish(f"{source.raw.path} -> {variant.target}", table.id)
    preprocessing = preprocessing_spec(walk.preprocessing_layers)
    result = _result(source, walk, kwargs, state_dict, preprocessing)
    result.notes = eps_notes(walk.bn, target_manifest)
    if progress:
        progress(total, total, "")
    return result


def eps_notes(bn_config: dict[str, dict[str, Any]], target_manifest: dict[str, Any]) -> list[str]:
    """For a user's module (a manifest read from the built model): the BatchNorm modules whose
    constructed eps is not the source's, which a plain ``load_state_dict`` would keep."""
    if target_manifest.get("library") != "user":
        return []
    built = target_manifest.get("bn_modules", {})
    pairs = {n: (built[n]["eps"], c["eps"]) for n, c in bn_config.items() if n in built}
    return eps_mismatch_notes(pairs)


def eps_mismatch_notes(pairs: dict[str, tuple[float, float]]) -> list[str]:
    """One note per (constructed eps, source eps) that differ, naming the modules and the fix;
    ``pairs``: module -> (its eps, the source's)."""
    groups: dict[tuple[float, float], list[str]] = {}
    for name, (have, want) in pairs.items():
        if not np.isclose(have, want, rtol=1e-6, atol=0):
            groups.setdefault((have, want), []).append(name)
    return [
        f"BatchNorm eps: {listing(sorted(names))} constructed with eps={have:g}, the source's is"
        f" {want:g}; converter.load_model sets it, a plain load_state_dict does not (construct"
        f" them with eps={want:g}; momentum likewise, which matters in training only)"
        for (have, want), names in sorted(groups.items())
    ]


def apply_table(
    source: SourceModel,
    table: Table,
    variant: Variant,
    target_manifest: dict[str, Any],
    kwargs: dict[str, Any],
    progress: Progress | None = None,
    sink: OpenSink | None = None,
) -> ConversionResult:
    """Apply ``table``'s ``variant`` to a resolved source (no head reset): what converters of other
    source kinds (ONNX) share with the Keras path."""
    return _apply(source, table, variant, target_manifest, kwargs, None, progress, sink)


def _check_layer_tensors(layer: SourceLayer, streaming: bool = False) -> None:
    """Refuse NaN/inf in any variable and a negative BN moving variance. ``streaming``: a
    variable of SPILL_BYTES or more is left to the check of what it becomes on its way to the
    sink (every placed tensor is checked, naming it and this layer): one pass over the large
    tensors instead of two."""
    for var in layer.weights:
        array = layer.load(var)
        if streaming and array.nbytes >= SPILL_BYTES:
            continue
        check_finite(array, f"tensor {layer.keys[var]!r} (layer {layer.name}/{var})")
    if layer.class_name == "BatchNormalization" and "moving_variance" in layer.weights:
        variance = layer.load("moving_variance")
        if (variance < 0).any():
            raise InvalidTensorError(
                f"layer {layer.name!r} moving_variance has {int((variance < 0).sum())} negative "
                "values; the checkpoint is damaged"
            )


def _result(
    source: SourceModel,
    walk: _TableWalk,
    kwargs: dict[str, Any],
    state_dict: dict[str, np.ndarray],
    preprocessing: dict[str, Any],
) -> ConversionResult:
    variant, head = walk.variant, walk.head
    surgeries = list(variant.surgeries)
    metadata = _metadata(source, walk, kwargs, surgeries, preprocessing)
    if head:
        metadata["head_reset"] = json.dumps(head.report(), sort_keys=True)
    return ConversionResult(
        state_dict=state_dict,
        bn_config=walk.bn,
        preprocessing=preprocessing,
        metadata=metadata,
        layers=walk.layers,
        dropped=walk.dropped,
        target=variant.target,
        target_kwargs=kwargs,
        surgeries=surgeries,
        table_id=walk.table.id,
        source_arch=source.manifest_id,
        config_origin=source.config_origin,
        head_reset=head.report() if head else None,
        source_input_shape=_input_shape(source),
        source_input=input_info(source),
        source_path=source.raw.path,
        source_head=source.known_head.report() if source.known_head else None,
        nesting=source.nesting.report() if source.nesting else None,
    )


def _metadata(
    source: SourceModel,
    walk: _TableWalk,
    kwargs: dict[str, Any],
    surgeries: list[dict[str, Any]],
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
        "table.id": walk.table.id,
        "table.version": str(walk.table.version),
        "target": walk.variant.target,
        "target.kwargs": json.dumps(kwargs, sort_keys=True),
        "surgeries": json.dumps(surgeries, sort_keys=True),
        "bn_config": json.dumps(walk.bn, sort_keys=True),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "dropped": json.dumps(walk.dropped, sort_keys=True),
        "source.head": json.dumps(source.head.report() if source.head else None, sort_keys=True),
        **(
            {"source.nesting": json.dumps(source.nesting.report(), sort_keys=True)}
            if source.nesting
            else {}
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


def input_info(source: SourceModel) -> dict[str, Any] | None:
    """What verification feeds the source: the declared input's dtype, and for integer inputs
    (token ids) the smallest Embedding vocabulary (ids stay below it)."""
    if source.config_origin not in ("file", "model"):
        return None
    dtype = next(
        (
            str(lay.config.get("dtype", "float32"))
            for lay in source.layers
            if lay.class_name == "InputLayer"
        ),
        None,
    )
    if dtype is None:
        return None
    vocab = [int(lay.config["input_dim"]) for lay in source.layers if lay.class_name == "Embedding"]
    return {"dtype": dtype, **({"vocab": min(vocab)} if vocab and "int" in dtype else {})}


def dry_run(table: Table, variant: Variant, seed: int = 0) -> ConversionResult:
    """Run ``variant`` of ``table`` on synthetic tensors shaped like its source manifest, against
    its target manifest (the shipped one, or built with the variant's kwargs when the shipped one
    was built with others, as ``convert`` does): proves the table covers every source tensor and
    fills every target tensor with the right shapes, without TensorFlow (nor PyTorch, unless the
    target is built)."""
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
    if target_manifest.get("kwargs", {}) != variant.target_kwargs:  # another width (width_mult)
        target_manifest = target_manifest_for(variant, dict(variant.target_kwargs))
    return _apply(source, table, variant, target_manifest, dict(variant.target_kwargs), None, None)


def _synthetic_checkpoint(source_manifest: dict[str, Any], name: str, seed: int) -> RawCheckpoint:
    """A TF-checkpoint-like RawCheckpoint: one uniform(0.5, 1.5) tensor per manifest variable."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, RawTensor] = {}
    for layer in source_manifest["layers"]:
        for var in layer["vars"]:
            key = f"{layer['name']}/{var['name']}"
            shape = tuple(var["shape"])
            array = rng.uniform(0.5, 1.5, shape).astype(var["dtype"])
            tensors[key] = RawTensor(key, shape, var["dtype"], lambda a=array: a)
    return RawCheckpoint(Path(name), "tf-checkpoint", tensors, _sha256="0" * 64)
