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
from .nesting import (
    Head,
    HeadSpec,
    Nesting,
    Split,
    describe_head,
    pooling_from_groups,
    shapes_fit,
    skeleton_modes,
    split_nested,
    training_flag,
)
from .registry import Registry
from .tables import Table, builtin_tables


@dataclass
class SourceLayer:
    """One Keras layer: its given name, class, config (and where the config came from), variables."""

    name: str
    class_name: str
    config: dict[str, Any]
    config_origin: str  # "file" | "manifest" | "model"
    weights: dict[str, RawTensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # var name -> key in the file
    index: int = 0
    scope: str = ""  # "": a layer of the model itself; else the nested model layer it is inside

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
    head: Head | None = None  # what the model ends with (see converter.nesting)
    nesting: Nesting | None = None  # set when the application is one layer of the user's model

    @property
    def weighted(self) -> list[SourceLayer]:
        return [lay for lay in self.layers if lay.weights]

    @property
    def head_layers(self) -> list[SourceLayer]:
        """The user's layers around a nested base (they are the head), else none."""
        return [lay for lay in self.layers if lay.scope == ""] if self.nesting else []

    def layer(self, name: str) -> SourceLayer:
        for lay in self.layers:
            if lay.name == name:
                return lay
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
    scope: str = ""  # the nested model layer this layer is inside ("" for the model's own layers)


class Skeleton(list):
    """Layers in model order, plus the flat variable order when known (SavedModel) and the
    nested model, when the application is one layer of the user's model (flattened in place)."""

    flat: list[tuple[int, str]] | None = None
    nesting: Nesting | None = None
    blocks: dict[str, str] = (
        {}
    )  # the model's own nested Sequentials (ConvNeXt's stem): name -> class


def snake_case(name: str) -> str:
    """Keras' auto-name rule (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


def is_auto_name(name: str, class_name: str) -> bool:
    return re.fullmatch(re.escape(snake_case(class_name)) + r"(_\d+)?", name) is not None


def skeleton_from_config(model_config: dict[str, Any], label: Path) -> Skeleton:
    """The stored model config's layers in order; one nested model (an application used as a layer
    of the user's model) is flattened in place, its layers carrying its name as ``scope``."""
    out = Skeleton()
    for entry, name, cls, lcfg in _config_layers(model_config, label):
        if not (isinstance(lcfg, dict) and "layers" in lcfg):
            out.append(LayerSkeleton(name, cls, lcfg))
            continue
        if cls == "Sequential":  # a block of the model itself, flattened in place
            out.blocks = {**out.blocks, name: cls}
            out += [
                LayerSkeleton(n, c, cfg, scope=name)
                for _, n, c, cfg in _config_layers(entry, label)
            ]
            continue
        if out.nesting is not None:
            raise UnsupportedLayerError(
                f"{label}: layers {out.nesting.layer!r} and {name!r} are both nested models; one"
                " nested application is supported: pass --source-model, or convert each part"
                " separately"
            )
        out.nesting = Nesting(
            model_config.get("class_name", "Functional"), name, cls, training_flag(entry)
        )
        for _, iname, icls, icfg in _config_layers(entry, label):
            if isinstance(icfg, dict) and "layers" in icfg:
                raise UnsupportedLayerError(
                    f"{label}: layer {iname!r} inside {name!r} is a model nested two levels deep;"
                    " flatten it first"
                )
            out.append(LayerSkeleton(iname, icls, icfg, scope=name))
    return out


def _config_layers(model_config: dict[str, Any], label: Path) -> list[tuple[dict, str, str, Any]]:
    """(entry, name, class, config) of a model config's layers (a Sequential's InputLayer left out)."""
    cfg = model_config.get("config", model_config)
    if not isinstance(cfg, dict) or "layers" not in cfg:
        raise SourceFormatError(
            f"{label}: the stored model config has no layer list; is it a Functional/Sequential"
            " model?"
        )
    is_sequential = model_config.get("class_name") == "Sequential"
    out = []
    for entry in cfg["layers"]:
        cls = entry.get("class_name", "")
        lcfg = entry.get("config", {})
        if is_sequential and cls == "InputLayer":
            continue
        out.append((entry, lcfg.get("name") or entry.get("name"), cls, lcfg))
    return out


def unnumbered_var(name: str) -> str:
    """A weight added without a name (Keras 3's ConvNeXt LayerScale) is auto-named ``variable``,
    ``variable_1``, ... in the order of the process that built it: one name for all of them."""
    return re.sub(r"^variable_\d+$", "variable", name)


def skeleton_from_manifest(manifest: dict[str, Any]) -> list[LayerSkeleton]:
    skel = Skeleton(
        LayerSkeleton(
            lay["name"],
            lay["class_name"],
            lay["config"],
            [(unnumbered_var(v["name"]), tuple(v["shape"])) for v in lay["vars"]],
            lay.get("op_index"),
            lay.get("scope", ""),
        )
        for lay in manifest["layers"]
    )
    if manifest.get("flat_variables") is not None:
        skel.flat = [(int(i), unnumbered_var(str(n))) for i, n in manifest["flat_variables"]]
    scopes = {
        lay["scope"]: lay.get("scope_class", "Functional")
        for lay in manifest["layers"]
        if lay.get("scope")
    }
    skel.blocks = {n: c for n, c in scopes.items() if c == "Sequential"}
    nested = sorted(n for n, c in scopes.items() if c != "Sequential")
    if nested:
        skel.nesting = Nesting("Functional", nested[0])
    return skel


# ------------------------------------------------------------------ per-format key resolution
# A resolver maps each tensor key to (layer index in the skeleton, variable name), or raises.

Resolver = Callable[[RawCheckpoint, list[LayerSkeleton]], dict[str, tuple[int, str]]]
RESOLVERS: Registry[Resolver] = Registry("key resolver")


class NoFit(Exception):
    """The skeleton does not fit the file (detection tries the next candidate)."""


def _by_name(skel: list[LayerSkeleton]) -> dict[str, int]:
    return {s.name: i for i, s in enumerate(skel)}


def _auto_names(skel: list[LayerSkeleton]) -> dict[str, int]:
    counts: dict[str, int] = {}
    out = {}
    for i, s in enumerate(skel):
        base = snake_case(s.class_name)
        n = counts.get(base, 0)
        counts[base] = n + 1
        out[base if n == 0 else f"{base}_{n}"] = i
    return out


def match_layer_names(raw_names: list[str], skel: list[LayerSkeleton]) -> dict[str, int]:
    """Layer names from a file -> skeleton indices. Given names match by name; Keras auto names
    (``conv2d_3``) match by class, in order, so a file saved in another session still fits.
    Raises NoFit for a name that fits no layer."""
    by_name = _by_name(skel)
    out: dict[str, int] = {}
    used: set[int] = set()
    pending = []
    for n in raw_names:
        if n in by_name and not (
            is_auto_name(n, skel[by_name[n]].class_name) and by_name[n] in used
        ):
            out[n] = by_name[n]
            used.add(by_name[n])
        else:
            pending.append(n)
    for n in pending:
        base = re.sub(r"_\d+$", "", n)
        cands = [
            i
            for i, s in enumerate(skel)
            if i not in used
            and snake_case(s.class_name) == base
            and is_auto_name(s.name, s.class_name)
        ]
        if not cands:
            raise NoFit(n)
        out[n] = cands[0]
        used.add(cands[0])
    return out


def _group_of(key: str) -> str:
    """``layers/<group>/vars/<i>`` -> ``<group>`` (``functional/layers/conv2d`` inside a nested model)."""
    return key[len("layers/") : key.rindex("/vars/")]


def _numbered_vars(
    raw: RawCheckpoint, skel: list[LayerSkeleton], group_index: dict[str, int]
) -> dict[str, tuple[int, str]]:
    groups: dict[str, list[str]] = {}
    for key in raw.tensors:
        groups.setdefault(_group_of(key), []).append(key)
    out = {}
    for g, keys in groups.items():
        if g not in group_index:
            raise NoFit(g)
        i = group_index[g]
        names = var_names(skel[i].class_name, skel[i].config, len(keys))
        if names is None:
            if skel[i].shapes and len(skel[i].shapes) == len(keys):
                names = [v for v, _ in skel[i].shapes]
            else:
                raise NoFit(f"{g}: cannot name {len(keys)} variables of {skel[i].class_name}")
        for key in sorted(keys, key=lambda k: int(k.rsplit("/", 1)[1])):
            out[key] = (i, names[int(key.rsplit("/", 1)[1])])
    return out


def _match_scoped(
    names: dict[str, tuple[str, str]], skel: list[LayerSkeleton], auto: bool = False
) -> dict[str, int]:
    """Item -> skeleton index, for items given as (scope, layer name): names are matched within
    their scope (the model's own layers, or the nested model's); ``auto``: by Keras auto name."""
    out: dict[str, int] = {}
    for scope in sorted({sc for sc, _ in names.values()}):
        sub = [i for i, s in enumerate(skel) if s.scope == scope]
        items = {k: n for k, (sc, n) in names.items() if sc == scope}
        if auto:
            index = _auto_names([skel[i] for i in sub])
            out.update({k: sub[index[n]] for k, n in items.items() if n in index})
        else:
            index = match_layer_names(sorted(set(items.values())), [skel[i] for i in sub])
            out.update({k: sub[index[n]] for k, n in items.items()})
    return out


def match_scoped_layers(layers: list[SourceLayer], skel: list[LayerSkeleton]) -> dict[str, int]:
    """Source layer name -> skeleton index, the nested base's layers matched among the skeleton's
    nested layers and the user's among its own (what the Keras runner loads weights with)."""
    nesting, blocks = getattr(skel, "nesting", None), getattr(skel, "blocks", {})
    inner = nesting.layer if nesting else ""
    scopes = {
        lay.name: lay.scope if lay.scope in blocks else inner if lay.scope else "" for lay in layers
    }
    return _match_scoped({lay.name: (scopes[lay.name], lay.name) for lay in layers}, skel)


def _scope_of_path(parts: list[str], skel: list[LayerSkeleton], what: str) -> str:
    """The skeleton scope of a file path's leading nested-model parts (none: the model's own)."""
    if not parts:
        return ""
    blocks = getattr(skel, "blocks", {})
    auto = _block_auto_names(blocks)
    if len(parts) == 1 and (parts[0] in blocks or parts[0] in auto):
        return parts[0] if parts[0] in blocks else auto[parts[0]]
    nesting = getattr(skel, "nesting", None)
    if nesting is None or len(parts) > 1:
        raise NoFit(f"{what}: nested layers the model config does not have")
    return nesting.layer


def _block_auto_names(blocks: dict[str, str]) -> dict[str, str]:
    """Keras auto name (``sequential_1``, what a ``.weights.h5`` path says) -> block name."""
    counts: dict[str, int] = {}
    out = {}
    for name, cls in blocks.items():
        base = snake_case(cls)
        n = counts.get(base, 0)
        counts[base] = n + 1
        out[base if n == 0 else f"{base}_{n}"] = name
    return out


@RESOLVERS.register("keras")
@RESOLVERS.register("weights.h5")
def _resolve_weights_h5(
    raw: RawCheckpoint, skel: list[LayerSkeleton]
) -> dict[str, tuple[int, str]]:
    names = {}
    for g in {_group_of(k) for k in raw.tensors}:
        *outer, leaf = g.split("/layers/")
        given = raw.group_names.get(g, leaf) if raw.group_names else leaf
        names[g] = (_scope_of_path(outer, skel, g), given)
    return _numbered_vars(raw, skel, _match_scoped(names, skel, auto=not raw.group_names))


@RESOLVERS.register("h5")
def _resolve_legacy_h5(raw: RawCheckpoint, skel: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    """``[model_weights/]<layer>/.../<var>``; a nested model's weights are
    ``model_weights/<nested model>/<inner layer>/<var>``."""
    nesting = getattr(skel, "nesting", None)
    names, var = {}, {}
    for k in raw.tensors:
        p = k.split("/")
        p = p[1:] if p[0] == "model_weights" else p
        if nesting is not None and p[0] == nesting.layer and len(p) > 2:
            names[k] = (nesting.layer, p[1])
        elif p[0] in getattr(skel, "blocks", {}) and len(p) > 3:  # <block>/<block>/<layer>/<var>
            names[k] = (p[0], p[2])
        else:
            names[k] = ("", p[0])
        var[k] = p[-1].split(":")[0]
    index = _match_scoped(names, skel)
    return {k: (index[k], var[k]) for k in raw.tensors}


_OBJ = re.compile(
    r"^(?:.*/)?(?P<kind>_operations|layer_with_weights-|layer-)/?(?P<i>\d+)/(?P<attr>.+?)/\.ATTRIBUTES/VARIABLE_VALUE$"
)
_FLAT = re.compile(r"^variables/(?P<i>\d+)/\.ATTRIBUTES/VARIABLE_VALUE$")  # model.variables order


@RESOLVERS.register("tf-checkpoint")
@RESOLVERS.register("savedmodel")
def _resolve_tf(raw: RawCheckpoint, skel: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    keys = list(raw.tensors)
    if all(_FLAT.match(k) for k in keys):
        return _resolve_flat(raw, skel)
    with_weights = [i for i, s in enumerate(skel) if _n_vars(s)]
    by_op = {s.op_index: i for i, s in enumerate(skel) if s.op_index is not None}
    out: dict[str, tuple[int, str]] = {}
    named = []
    for k in keys:
        m = _OBJ.match(k)
        if m:
            i = int(m["i"])
            if m["kind"] == "layer_with_weights-":
                idx = with_weights[i] if i < len(with_weights) else len(skel)
            elif m["kind"] == "_operations" and by_op:
                idx = by_op.get(i, len(skel))
            else:
                idx = i
            if idx >= len(skel):
                raise NoFit(k)
            attr = m["attr"].split("/")[-1]
            out[k] = (idx, canonical_attr(skel[idx].class_name, attr))
        elif "/" in k and ".ATTRIBUTES" not in k:
            named.append(k)  # name-based (TF1): <layer>/<var>
        else:
            raise NoFit(k)
    if named:
        layer_of = {k: k.rsplit("/", 1)[0] for k in named}
        index = match_layer_names(sorted(set(layer_of.values())), skel)
        for k in named:
            out[k] = (index[layer_of[k]], k.rsplit("/", 1)[1].split(":")[0])
    return out


def _n_vars(s: LayerSkeleton) -> int:
    if s.shapes is not None:
        return len(s.shapes)
    return (
        len(KERAS_LAYERS.get(s.class_name).names(s.config)) if s.class_name in KERAS_LAYERS else 0
    )


def _resolve_flat(raw: RawCheckpoint, skel: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    flat: list[tuple[int, str]] = []
    if getattr(skel, "flat", None) is not None:
        flat = list(skel.flat)
    else:
        flat = _flat_from_layers(skel)
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


def _flat_from_layers(skel: list[LayerSkeleton]) -> list[tuple[int, str]]:
    flat: list[tuple[int, str]] = []
    for i, s in enumerate(skel):
        if s.shapes is not None:
            flat += [(i, v) for v, _ in s.shapes]
        elif s.class_name in KERAS_LAYERS:
            flat += [(i, v) for v in KERAS_LAYERS.get(s.class_name).names(s.config)]
    return flat


# ------------------------------------------------------------------ assembling


def build_layers(raw: RawCheckpoint, skel: list[LayerSkeleton], origin: str) -> list[SourceLayer]:
    """Attach the file's tensors to the skeleton; raises NoFit when they do not belong to it."""
    resolver = RESOLVERS.get(raw.format)
    assignment = resolver(raw, skel)
    layers = [
        SourceLayer(s.name, s.class_name, s.config, origin, index=i, scope=s.scope)
        for i, s in enumerate(skel)
    ]
    for key in raw.tensors:
        if key not in assignment:
            raw.ignored.setdefault(key, "not a layer weight (e.g. a Dropout seed generator state)")
    for key, (i, var) in assignment.items():
        lay, var = layers[i], unnumbered_var(var)
        if var in lay.weights:
            raise NoFit(f"{key}: layer {lay.name} variable {var} appears twice")
        lay.weights[var] = raw.tensors[key]
        lay.keys[var] = key
    for s, lay in zip(skel, layers):
        if s.shapes is not None:
            want = dict(s.shapes)
            got = {v: tuple(t.shape) for v, t in lay.weights.items()}
            if not shapes_fit(got, want):
                raise NoFit(f"layer {s.name}: file has {got}, manifest {want}")
    return layers


def structure_key(layers: list[Any], spec: HeadSpec | None = None) -> list[tuple[str, str, tuple]]:
    """What must agree between a file and a manifest: classes, names (auto names by class) and
    shapes of the weighted layers; the head (``spec``: the table's ``[head]``) left out, so a
    re-headed or headless build matches the stock one."""
    out = []
    for lay in layers:
        if isinstance(lay, LayerSkeleton):
            shapes = tuple(sorted(lay.shapes or []))
        else:
            shapes = tuple(sorted((v, tuple(t.shape)) for v, t in lay.weights.items()))
        if shapes and not (spec and spec.is_top(lay.name)):
            name, cls = lay.name, lay.class_name
            out.append((snake_case(cls) if is_auto_name(name, cls) else name, cls, shapes))
    return out


def resolve(
    raw: RawCheckpoint,
    manifests: list[dict[str, Any]],
    source_model: dict[str, Any] | None = None,
    heads: dict[str, HeadSpec] | None = None,
) -> SourceModel:
    """Resolve ``raw`` into layers. ``manifests``: candidate shipped source manifests, tried in
    order; ``heads``: their tables' ``[head]`` by manifest id (what a re-headed, headless or nested
    source may lack or add)."""
    heads = heads or {}
    if source_model is not None:
        skel = skeleton_from_manifest(source_model)
        try:
            layers = build_layers(raw, skel, "model")
        except NoFit as exc:
            raise UnknownArchitectureError(
                f"{raw.path} does not fit the model from --source-model ({exc}); is it the same"
                " architecture?"
            ) from None
        return _described(raw, layers, manifests, heads, "model", getattr(skel, "nesting", None))
    if raw.model_config is not None:
        skel = skeleton_from_config(raw.model_config, raw.path)
        try:
            layers = build_layers(raw, skel, "file")
        except NoFit as exc:
            raise SourceFormatError(
                f"{raw.path}: weights do not match the file's own model config ({exc})"
            ) from None
        return _described(raw, layers, manifests, heads, "file", skel.nesting)
    for man in manifests:
        found = _fit_manifest(raw, man, heads.get(man["id"]))
        if found is not None:
            return found
    raise UnknownArchitectureError(
        f"{raw.path} ({raw.format}, {len(raw.tensors)} tensors) stores no model config and matches"
        f" no known architecture ({len(manifests)} tried); pass --source-model module:function that"
        " builds the Keras model, or --mapping with a table for it"
    )


def _described(
    raw: RawCheckpoint,
    layers: list[SourceLayer],
    manifests: list[dict[str, Any]],
    heads: dict[str, HeadSpec],
    origin: str,
    nesting: Nesting | None,
) -> SourceModel:
    """A source resolved from a config (the file's or the user's model): its manifest, head, nesting."""
    base = [lay for lay in layers if lay.scope == nesting.layer] if nesting else layers
    manifest_id = _matching_manifest(base, manifests, heads)
    spec = heads.get(manifest_id) if manifest_id else None
    outer = [lay for lay in layers if lay.scope == ""] if nesting else base
    head = describe_head(outer, spec, nesting is not None, True)
    return SourceModel(raw, layers, manifest_id, origin, head, nesting)


def _fit_manifest(
    raw: RawCheckpoint, man: dict[str, Any], spec: HeadSpec | None
) -> SourceModel | None:
    """The file read as this shipped architecture (stock, re-headed, headless, or nested as the base
    of the user's model), or None when it does not fit."""
    split = split_nested(raw)
    for mode, skel in skeleton_modes(skeleton_from_manifest(man), spec):
        part = split or (split_nested(raw, len(skel.flat)) if getattr(skel, "flat", None) else None)
        try:
            if part is None:
                layers = build_layers(raw, skel, "manifest")
                head = describe_head(layers, spec, False, False)
                if head.kind == "headless":
                    head.pooling = pooling_from_groups(raw, skel)
                return SourceModel(raw, layers, man["id"], "manifest", head)
            layers = build_layers(part.inner, skel, "manifest")
        except (NoFit, ConverterError):
            continue
        return _joined(raw, part, layers, man["id"], spec)
    return None


def _joined(
    raw: RawCheckpoint,
    part: Split,
    layers: list[SourceLayer],
    manifest_id: str,
    spec: HeadSpec | None,
) -> SourceModel:
    """A nested source: the base's layers (keys back to the file's) then the user's layers."""
    for lay in layers:
        lay.scope = part.nesting.layer
        lay.keys = {v: part.original.get(k, k) for v, k in lay.keys.items()}
    for key, why in [*part.inner.ignored.items(), *part.ignored.items()]:
        raw.ignored.setdefault(part.original.get(key, key), why)
    outer = [
        SourceLayer(o.name, o.class_name, {}, "manifest", o.weights, o.keys, len(layers) + i)
        for i, o in enumerate(part.outer)
    ]
    head = describe_head(outer, spec, True, part.sees_unweighted)
    return SourceModel(raw, layers + outer, manifest_id, "manifest", head, part.nesting)


def _matching_manifest(
    layers: list[SourceLayer],
    manifests: list[dict[str, Any]],
    heads: dict[str, HeadSpec] | None = None,
) -> str | None:
    heads = heads or {}
    for man in manifests:
        spec = heads.get(man["id"])
        if structure_key(skeleton_from_manifest(man), spec) == structure_key(layers, spec):
            return man["id"]
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


def head_specs(tables: list[Table]) -> dict[str, HeadSpec]:
    """Each source manifest's ``[head]`` (the first table naming the manifest that declares one)."""
    out: dict[str, HeadSpec] = {}
    for table in tables:
        if not table.head:
            continue
        spec = HeadSpec(table.head["source"], table.head.get("top"))
        for variant in table.variants:
            if variant.source:
                out.setdefault(variant.source, spec)
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
    tables = builtin_tables() if tables is None else tables
    manifests = source_manifests(tables)
    model_manifest = _source_model_manifest(source_model) if source_model else None
    return resolve(raw, manifests, model_manifest, head_specs(tables))


def _source_model_manifest(spec: str) -> dict[str, Any]:
    from .manifest import source_manifest_from_model
    from .model import call_factory, prefer_torch_first

    prefer_torch_first()  # the factory imports Keras; a PyTorch target is built after it

    model = call_factory(spec, "--source-model")
    return source_manifest_from_model(model, f"model:{spec}")
