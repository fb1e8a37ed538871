"""Resolve a raw checkpoint into Keras layers: names, classes, configs and variables.

Files that carry a model config (``.keras``, whole-model legacy ``.h5``) describe themselves. Files
that do not (``.weights.h5``, TF checkpoints, SavedModel variables) are resolved against a layer
manifest: a shipped one found by structural match, or one made from a model the user supplies
(``--source-model module:function``, their own trusted code).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import formats
from .errors import (
    ConverterError,
    MappingError,
    SourceFormatError,
    UnknownArchitectureError,
    UnsupportedLayerError,
)
from .formats import RawCheckpoint, RawTensor
from .keras_layers import KERAS_LAYERS, canonical_attr, var_names
from .manifest import load_manifest
from .registry import Registry
from .tables import Table, builtin_tables


@dataclass
class SourceLayer:
    """One Keras layer: its given name, class, config (and where the config came from) and
    variables."""

    name: str
    class_name: str
    config: dict[str, Any]
    config_origin: str  # "file" | "manifest" | "model"
    weights: dict[str, RawTensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # var name -> key in the file
    index: int = 0

    def load(self, var: str) -> np.ndarray:
        return self.weights[var].load()


@dataclass
class SourceModel:
    """A resolved source: the raw checkpoint, its layers in model order, the shipped manifest it
    matches (if any) and where the layer configs came from (``file``, ``manifest``, ``model``)."""

    raw: RawCheckpoint
    layers: list[SourceLayer]
    manifest_id: str | None  # the shipped manifest this source matches, if any
    config_origin: str

    @property
    def weighted(self) -> list[SourceLayer]:
        return [layer for layer in self.layers if layer.weights]

    def layer(self, name: str) -> SourceLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


# ------------------------------------------------------------------ skeletons


@dataclass
class LayerSkeleton:
    """A layer before the file's tensors are attached: name, class, config, and, from a manifest,
    its variables' shapes and its index in ``model._operations``."""

    name: str
    class_name: str
    config: dict[str, Any]
    shapes: list[tuple[str, tuple[int, ...]]] | None = None  # (var, shape) when known (manifests)
    op_index: int | None = None  # index in model._operations (TF object checkpoints), when known


class Skeleton(list):
    """Layers in model order, plus the flat variable order when known (SavedModel)."""

    flat: list[tuple[int, str]] | None = None


def snake_case(name: str) -> str:
    """Keras' auto-name rule (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


def is_auto_name(name: str, class_name: str) -> bool:
    return re.fullmatch(re.escape(snake_case(class_name)) + r"(_\d+)?", name) is not None


def skeleton_from_config(model_config: dict[str, Any], label: Path) -> list[LayerSkeleton]:
    cfg = model_config.get("config", model_config)
    if not isinstance(cfg, dict) or "layers" not in cfg:
        raise SourceFormatError(
            f"{label}: the stored model config has no layer list; "
            "is it a Functional/Sequential model?"
        )
    is_sequential = model_config.get("class_name") == "Sequential"
    out = []
    for entry in cfg["layers"]:
        cls = entry.get("class_name", "")
        lcfg = entry.get("config", {})
        name = lcfg.get("name") or entry.get("name")
        if is_sequential and cls == "InputLayer":
            continue
        if isinstance(lcfg, dict) and "layers" in lcfg:
            raise UnsupportedLayerError(
                f"{label}: layer {name!r} is a nested {cls}; nested models are not supported yet, "
                "flatten it first"
            )
        out.append(LayerSkeleton(name, cls, lcfg))
    return out


def skeleton_from_manifest(manifest: dict[str, Any]) -> list[LayerSkeleton]:
    skeleton = Skeleton(
        LayerSkeleton(
            layer["name"],
            layer["class_name"],
            layer["config"],
            [(v["name"], tuple(v["shape"])) for v in layer["vars"]],
            layer.get("op_index"),
        )
        for layer in manifest["layers"]
    )
    if manifest.get("flat_variables") is not None:
        skeleton.flat = [(int(i), str(n)) for i, n in manifest["flat_variables"]]
    return skeleton


# ------------------------------------------------------------------ per-format key resolution
# A resolver maps each tensor key to (layer index in the skeleton, variable name), or raises.

Resolver = Callable[[RawCheckpoint, list[LayerSkeleton]], dict[str, tuple[int, str]]]
RESOLVERS: Registry[Resolver] = Registry("key resolver")


class NoFit(Exception):
    """The skeleton does not fit the file (detection tries the next candidate)."""


def _by_name(skeleton: list[LayerSkeleton]) -> dict[str, int]:
    return {s.name: i for i, s in enumerate(skeleton)}


def _auto_names(skeleton: list[LayerSkeleton]) -> dict[str, int]:
    counts: dict[str, int] = {}
    out = {}
    for i, s in enumerate(skeleton):
        base = snake_case(s.class_name)
        n = counts.get(base, 0)
        counts[base] = n + 1
        out[base if n == 0 else f"{base}_{n}"] = i
    return out


def match_layer_names(raw_names: list[str], skeleton: list[LayerSkeleton]) -> dict[str, int]:
    """Layer names from a file -> skeleton indices. Given names match by name; Keras auto names
    (``conv2d_3``) match by class, in order, so a file saved in another session still fits.
    Raises NoFit for a name that fits no layer."""
    by_name = _by_name(skeleton)
    out: dict[str, int] = {}
    used: set[int] = set()
    pending = []
    for n in raw_names:
        if n in by_name and not (
            is_auto_name(n, skeleton[by_name[n]].class_name) and by_name[n] in used
        ):
            out[n] = by_name[n]
            used.add(by_name[n])
        else:
            pending.append(n)
    for n in pending:
        base = re.sub(r"_\d+$", "", n)
        cands = [
            i
            for i, s in enumerate(skeleton)
            if i not in used
            and snake_case(s.class_name) == base
            and is_auto_name(s.name, s.class_name)
        ]
        if not cands:
            raise NoFit(n)
        out[n] = cands[0]
        used.add(cands[0])
    return out


def _numbered_vars(
    raw: RawCheckpoint, skeleton: list[LayerSkeleton], group_index: dict[str, int]
) -> dict[str, tuple[int, str]]:
    groups: dict[str, list[str]] = {}
    for key in raw.tensors:
        g = key.split("/")[1]
        groups.setdefault(g, []).append(key)
    out = {}
    for g, keys in groups.items():
        if g not in group_index:
            raise NoFit(g)
        i = group_index[g]
        names = var_names(skeleton[i].class_name, skeleton[i].config, len(keys))
        if names is None:
            if skeleton[i].shapes and len(skeleton[i].shapes) == len(keys):
                names = [v for v, _ in skeleton[i].shapes]
            else:
                raise NoFit(f"{g}: cannot name {len(keys)} variables of {skeleton[i].class_name}")
        for key in sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1])):
            out[key] = (i, names[int(key.rsplit("/", 1)[1])])
    return out


@RESOLVERS.register("keras")
@RESOLVERS.register("weights.h5")
def _resolve_weights_h5(
    raw: RawCheckpoint, skeleton: list[LayerSkeleton]
) -> dict[str, tuple[int, str]]:
    groups = sorted({k.split("/")[1] for k in raw.tensors})
    if raw.group_names:
        real = match_layer_names([raw.group_names.get(g, g) for g in groups], skeleton)
        index = {g: real[raw.group_names.get(g, g)] for g in groups}
    else:
        auto = _auto_names(skeleton)
        index = {g: auto[g] for g in groups if g in auto}
    return _numbered_vars(raw, skeleton, index)


@RESOLVERS.register("h5")
def _resolve_legacy_h5(
    raw: RawCheckpoint, skeleton: list[LayerSkeleton]
) -> dict[str, tuple[int, str]]:
    parts = {k: k.split("/") for k in raw.tensors}
    layer_of = {k: (p[1] if p[0] == "model_weights" else p[0]) for k, p in parts.items()}
    index = match_layer_names(sorted(set(layer_of.values())), skeleton)
    return {k: (index[layer_of[k]], p[-1].split(":")[0]) for k, p in parts.items()}


_OBJ = re.compile(
    r"^(?:.*/)?(?P<kind>_operations|layer_with_weights-|layer-)/?(?P<i>\d+)/"
    r"(?P<attr>.+?)/\.ATTRIBUTES/VARIABLE_VALUE$"
)
_FLAT = re.compile(r"^variables/(?P<i>\d+)/\.ATTRIBUTES/VARIABLE_VALUE$")  # model.variables order


@RESOLVERS.register("tf-checkpoint")
@RESOLVERS.register("savedmodel")
def _resolve_tf(raw: RawCheckpoint, skeleton: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    keys = list(raw.tensors)
    if all(_FLAT.match(k) for k in keys):
        return _resolve_flat(raw, skeleton)
    with_weights = [i for i, s in enumerate(skeleton) if _n_vars(s)]
    by_op = {s.op_index: i for i, s in enumerate(skeleton) if s.op_index is not None}
    out: dict[str, tuple[int, str]] = {}
    named = []
    for k in keys:
        m = _OBJ.match(k)
        if m:
            i = int(m["i"])
            if m["kind"] == "layer_with_weights-":
                idx = with_weights[i] if i < len(with_weights) else len(skeleton)
            elif m["kind"] == "_operations" and by_op:
                idx = by_op.get(i, len(skeleton))
            else:
                idx = i
            if idx >= len(skeleton):
                raise NoFit(k)
            attr = m["attr"].split("/")[-1]
            out[k] = (idx, canonical_attr(skeleton[idx].class_name, attr))
        elif "/" in k and ".ATTRIBUTES" not in k:
            named.append(k)  # name-based (TF1): <layer>/<var>
        else:
            raise NoFit(k)
    if named:
        layer_of = {k: k.rsplit("/", 1)[0] for k in named}
        index = match_layer_names(sorted(set(layer_of.values())), skeleton)
        for k in named:
            out[k] = (index[layer_of[k]], k.rsplit("/", 1)[1].split(":")[0])
    return out


def _n_vars(s: LayerSkeleton) -> int:
    if s.shapes is not None:
        return len(s.shapes)
    return (
        len(KERAS_LAYERS.get(s.class_name).names(s.config)) if s.class_name in KERAS_LAYERS else 0
    )


def _resolve_flat(raw: RawCheckpoint, skeleton: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    flat: list[tuple[int, str]] = []
    if getattr(skeleton, "flat", None) is not None:
        flat = list(skeleton.flat)
    else:
        flat = _flat_from_layers(skeleton)
    out = {}
    for k in raw.tensors:
        n = int(_FLAT.match(k)["i"])
        if n >= len(flat):
            raise NoFit(k)
        if flat[n][0] < 0:
            continue  # not a layer weight (Dropout seed state): resolve() records it as ignored
        out[k] = flat[n]
    if len(raw.tensors) != len(flat):
        raise NoFit(f"{len(raw.tensors)} variables in the file, {len(flat)} in the model")
    return out


def _flat_from_layers(skeleton: list[LayerSkeleton]) -> list[tuple[int, str]]:
    flat: list[tuple[int, str]] = []
    for i, s in enumerate(skeleton):
        if s.shapes is not None:
            flat += [(i, v) for v, _ in s.shapes]
        elif s.class_name in KERAS_LAYERS:
            flat += [(i, v) for v in KERAS_LAYERS.get(s.class_name).names(s.config)]
    return flat


# ------------------------------------------------------------------ assembling


def build_layers(
    raw: RawCheckpoint, skeleton: list[LayerSkeleton], origin: str
) -> list[SourceLayer]:
    """Attach the file's tensors to the skeleton; raises NoFit when they do not belong to it."""
    resolver = RESOLVERS.get(raw.format)
    assignment = resolver(raw, skeleton)
    layers = [
        SourceLayer(s.name, s.class_name, s.config, origin, index=i) for i, s in enumerate(skeleton)
    ]
    for key in raw.tensors:
        if key not in assignment:
            raw.ignored.setdefault(key, "not a layer weight (e.g. a Dropout seed generator state)")
    for key, (i, var) in assignment.items():
        layer = layers[i]
        if var in layer.weights:
            raise NoFit(f"{key}: layer {layer.name} variable {var} appears twice")
        layer.weights[var] = raw.tensors[key]
        layer.keys[var] = key
    for s, layer in zip(skeleton, layers):
        if s.shapes is not None:
            want = dict(s.shapes)
            got = {v: tuple(t.shape) for v, t in layer.weights.items()}
            if got != want:
                raise NoFit(f"layer {s.name}: file has {got}, manifest {want}")
    return layers


def structure_key(layers: list[Any]) -> list[tuple[str, str, tuple]]:
    """What must agree between a file and a manifest: classes, names (auto names by class) and
    shapes."""
    out = []
    for layer in layers:
        if isinstance(layer, LayerSkeleton):
            shapes = tuple(sorted(layer.shapes or []))
        else:
            shapes = tuple(sorted((v, tuple(t.shape)) for v, t in layer.weights.items()))
        if shapes:
            name, cls = layer.name, layer.class_name
            out.append((snake_case(cls) if is_auto_name(name, cls) else name, cls, shapes))
    return out


def resolve(
    raw: RawCheckpoint, manifests: list[dict[str, Any]], source_model: dict[str, Any] | None = None
) -> SourceModel:
    """Resolve ``raw`` into layers. ``manifests``: candidate shipped source manifests, tried in
    order. Most callers want ``resolve_source``."""
    if source_model is not None:
        skeleton = skeleton_from_manifest(source_model)
        try:
            layers = build_layers(raw, skeleton, "model")
        except NoFit as exc:
            raise UnknownArchitectureError(
                f"{raw.path} does not fit the model from --source-model ({exc}); "
                "is it the same architecture?"
            ) from None
        return SourceModel(raw, layers, _matching_manifest(layers, manifests), "model")
    if raw.model_config is not None:
        skeleton = skeleton_from_config(raw.model_config, raw.path)
        try:
            layers = build_layers(raw, skeleton, "file")
        except NoFit as exc:
            raise SourceFormatError(
                f"{raw.path}: weights do not match the file's own model config ({exc})"
            ) from None
        return SourceModel(raw, layers, _matching_manifest(layers, manifests), "file")
    misses = []
    for manifest in manifests:
        try:
            layers = build_layers(raw, skeleton_from_manifest(manifest), "manifest")
        except (NoFit, ConverterError) as exc:
            misses.append(f"{manifest['id']}: {exc}")
            continue
        return SourceModel(raw, layers, manifest["id"], "manifest")
    raise UnknownArchitectureError(
        f"{raw.path} ({raw.format}, {len(raw.tensors)} tensors) stores no model config and matches "
        f"no known architecture ({len(manifests)} tried); pass --source-model module:function that "
        "builds the Keras model, or --mapping with a table for it"
    )


def _matching_manifest(layers: list[SourceLayer], manifests: list[dict[str, Any]]) -> str | None:
    key = structure_key(layers)
    for manifest in manifests:
        if structure_key(skeleton_from_manifest(manifest)) == key:
            return manifest["id"]
    return None


# ------------------------------------------------------------------ one entry point


def source_manifests(tables: list[Table]) -> list[dict[str, Any]]:
    """The shipped source manifests the tables' variants name, each once, in table order
    (a table whose manifest is not shipped contributes none)."""
    seen, out = set(), []
    for table in tables:
        for variant in table.variants:
            if variant.source and variant.source not in seen:
                seen.add(variant.source)
                try:
                    out.append(load_manifest(variant.source))
                except MappingError:
                    continue  # a table for an architecture whose manifest is not shipped
    return out


def resolve_source(
    src: RawCheckpoint | str | os.PathLike,
    tables: list[Table] | None = None,
    *,
    source_model: str | None = None,
    format: str | None = None,
) -> SourceModel:
    """Read (unless ``src`` is already read) and resolve a Keras/TF source into layers: tried
    against the source manifests of ``tables`` (default: the built-in tables), or against the model
    that ``source_model`` (``module:function``, the user's own code) builds. What ``convert``,
    ``inspect`` and verification's Keras runner all use, so they agree on what a file is."""
    raw = src if isinstance(src, RawCheckpoint) else formats.read(src, format)
    if raw.format in ("safetensors", "pt"):
        raise SourceFormatError(
            f"{raw.path} is already a PyTorch-side file ({raw.format}); give the Keras/TF source"
        )
    manifests = source_manifests(builtin_tables() if tables is None else tables)
    model_manifest = _source_model_manifest(source_model) if source_model else None
    return resolve(raw, manifests, model_manifest)


def _source_model_manifest(spec: str) -> dict[str, Any]:
    from .manifest import source_manifest_from_model
    from .model import call_factory, prefer_torch_first

    prefer_torch_first()  # the factory imports Keras; a PyTorch target is built after it

    model = call_factory(spec, "--source-model")
    return source_manifest_from_model(model, f"model:{spec}")
