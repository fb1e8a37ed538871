"""Resolve a raw checkpoint into Keras layers: names, classes, configs and variables.

Files that carry a model config (``.keras``, whole-model legacy ``.h5``) describe themselves. Files
that do not (``.weights.h5``, TF checkpoints, SavedModel variables) are resolved against a layer
manifest: a shipped one found by structural match, or one made from a model the user supplies
(``--source-model module:function``, their own trusted code).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
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
from .keras_layers import KERAS_LAYERS, canonical_attr, sub_var_name, var_names
from .manifest import shape_key, source_manifest, weighted_layers
from .refusals import refusal_heads, refused_manifests
from .nesting import (
    Head,
    HeadSpec,
    Nesting,
    Split,
    describe_head,
    pooling_beyond_manifest,
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
    """One Keras layer: its given name, class, config (and where the config came from),
    variables."""

    name: str
    class_name: str
    config: dict[str, Any]
    config_origin: str  # "file" | "manifest" | "model"
    weights: dict[str, RawTensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # var name -> key in the file
    index: int = 0
    scope: str = ""  # "": a layer of the model itself; else the nested model layer it is inside
    file_name: str = ""  # the name the file gives it, when auto names were renumbered (else "")
    _held: dict[str, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load(self, var: str) -> np.ndarray:
        """The variable's values; read once per ``held()`` block."""
        held = self._held
        if held is None:
            return self.weights[var].load()
        if var not in held:
            held[var] = self.weights[var].load()
        return held[var]

    @contextmanager
    def held(self) -> Iterator[None]:
        """Within the block, each variable is read from the file once (checks then transforms
        read the same arrays); released after it, so memory holds one layer at a time."""
        self._held = {}
        try:
            yield
        finally:
            self._held = None


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
    source_model_config: dict[str, Any] | None = None  # the config --source-model's model has

    @property
    def model_config(self) -> dict[str, Any] | None:
        """The Keras model config (layers and their connections): the file's, else the one of
        the model ``--source-model`` built, else None."""
        return self.raw.model_config or self.source_model_config

    @property
    def weighted(self) -> list[SourceLayer]:
        return [lay for lay in self.layers if lay.weights]

    @property
    def head_layers(self) -> list[SourceLayer]:
        """The user's layers around a nested base (they are the head), else none."""
        if not self.nesting:
            return []
        return [lay for lay in self.layers if not within(lay.scope, self.nesting.layer)]

    @property
    def known_head(self) -> Head | None:
        """The head as reported to the user: None for a source no table recognises (its layers
        are not told apart from a table's ``[head]``, so "headless" would be a guess)."""
        return self.head if self.manifest_id or self.nesting else None

    @property
    def structure(self) -> str:
        """Its head and nesting in a few words where they are not the stock application's
        (``headless, pooling max; the base is layer 'resnet50v2' of ...``), else ""."""
        head = self.head
        stock = head is None or (head.kind == "classifier" and head.num_classes == 1000)
        parts = [] if stock and not self.nesting else [head.describe()] if head else []
        return "; ".join(parts + ([self.nesting.describe()] if self.nesting else []))

    @property
    def renamed(self) -> dict[str, str]:
        """The file's auto names renumbered to the architecture's (file name -> name used)."""
        return {lay.file_name: lay.name for lay in self.layers if lay.file_name}

    @property
    def notes(self) -> list[str]:
        """What the user should know about how the source was read."""
        if not self.renamed:
            return list(self.raw.notes)
        by_base: dict[str, list[tuple[str, str]]] = {}
        for old, new in self.renamed.items():
            by_base.setdefault(re.sub(r"_\d+$", "", new), []).append((old, new))
        shown = []
        for pairs in by_base.values():
            old, new = min(pairs, key=lambda p: auto_number(p[1]))
            shown.append(f"{old} -> {new}" + (f" (+{len(pairs) - 1})" if len(pairs) > 1 else ""))
        return [
            *self.raw.notes,
            "auto names renumbered (the model was built after other layers in its session):"
            f" {', '.join(shown)}",
        ]

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
    scope: str = ""  # the nested models' path this layer is inside ("" for the model's own)
    op_path: tuple[int, ...] | None = None  # ``_operations/<i>`` indices from the model (nested)


class Skeleton(list):
    """Layers in model order, nested models flattened in place at any depth (see ``within``),
    plus the flat variable order when known (SavedModel), the nested models (``scopes``: path ->
    class; ``training``: path -> how its parent calls it) and, when the application is nested in
    the user's model, where (``nesting``)."""

    flat: list[tuple[int, str]] | None = None
    nesting: Nesting | None = None
    scopes: dict[str, str] = {}
    training: dict[str, bool | None] = {}
    outer_class: str = "Functional"


def within(scope: str, root: str) -> bool:
    """Whether a layer of ``scope`` is inside the nested model at path ``root`` ("" the model)."""
    return not root or scope == root or scope.startswith(root + "/")


def _parent(scope: str) -> str:
    return scope.rsplit("/", 1)[0] if "/" in scope else ""


def snake_case(name: str) -> str:
    """Keras' auto-name rule (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


def is_auto_name(name: str, class_name: str) -> bool:
    return re.fullmatch(re.escape(snake_case(class_name)) + r"(_\d+)?", name) is not None


def auto_number(name: str) -> int:
    """The number of an auto name: ``conv2d`` 0, ``conv2d_7`` 7 (Keras numbers the auto names of a
    class session-wide, in creation order)."""
    m = re.search(r"_(\d+)$", name)
    return int(m[1]) if m else 0


def canonical_auto_names(layers: list[Any]) -> dict[str, str]:
    """Auto name -> the name it has in a fresh session, for ``layers`` (name, class_name): per
    class, by number (creation order, not model order): ``conv2d_2, conv2d_3`` -> ``conv2d,
    conv2d_1``. Only the names that change."""
    by_base: dict[str, list[str]] = {}
    for lay in layers:
        if is_auto_name(lay.name, lay.class_name):
            by_base.setdefault(snake_case(lay.class_name), []).append(lay.name)
    out = {}
    for base, names in by_base.items():
        for k, name in enumerate(sorted(names, key=auto_number)):
            new = base if k == 0 else f"{base}_{k}"
            if new != name:
                out[name] = new
    return out


def skeleton_from_config(model_config: dict[str, Any], label: Path) -> Skeleton:
    """The stored model config's layers in order, nested models (an application used as a layer
    of the user's model, the application's own blocks, at any depth) flattened in place, their
    layers carrying the nested models' path as ``scope``."""
    out = Skeleton()
    out.scopes, out.training = {}, {}
    out.outer_class = model_config.get("class_name", "Functional")
    _flatten_config(model_config, label, "", out)
    return out


def _flatten_config(model_config: dict[str, Any], label: Path, scope: str, out: Skeleton) -> None:
    for entry, name, cls, lcfg in _config_layers(model_config, label):
        if not (isinstance(lcfg, dict) and "layers" in lcfg):
            out.append(LayerSkeleton(name, cls, lcfg, scope=scope))
            continue
        path = f"{scope}/{name}" if scope else name
        out.scopes[path], out.training[path] = cls, training_flag(entry)
        _flatten_config(entry, label, path, out)


def _config_layers(model_config: dict[str, Any], label: Path) -> list[tuple[dict, str, str, Any]]:
    """(entry, name, class, config) of a model config's layers (a Sequential's InputLayer left
    out)."""
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
            tuple(lay["op_path"]) if lay.get("op_path") else None,
        )
        for lay in manifest["layers"]
    )
    if manifest.get("flat_variables") is not None:
        skel.flat = [(int(i), unnumbered_var(str(n))) for i, n in manifest["flat_variables"]]
    skel.scopes, skel.training = {}, {}
    for lay in manifest["layers"]:
        parts = lay["scope"].split("/") if lay.get("scope") else []
        for depth in range(1, len(parts)):  # a nested model holding only nested models
            skel.scopes.setdefault("/".join(parts[:depth]), "Functional")
        if parts:
            skel.scopes[lay["scope"]] = lay.get("scope_class", "Functional")
    return skel


# ------------------------------------------------------------------ per-format key resolution
# A resolver maps each tensor key to (layer index in the skeleton, variable name), or raises.

Resolver = Callable[[RawCheckpoint, list[LayerSkeleton]], dict[str, tuple[int, str]]]
RESOLVERS: Registry[Resolver] = Registry("key resolver")


class NoFit(Exception):
    """The skeleton does not fit the file (detection tries the next candidate)."""


class Assignment(dict):
    """What a resolver returns: tensor key -> (layer index, variable name), plus the file's auto
    names it renumbered (file name -> skeleton name, see match_layer_names)."""

    def __init__(self, items: dict[str, tuple[int, str]], renamed: dict[str, str] | None = None):
        super().__init__(items)
        self.renamed = renamed or {}


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


def match_layer_names(
    raw_names: list[str], skel: list[LayerSkeleton], renamed: dict[str, str] | None = None
) -> dict[str, int]:
    """Layer names from a file -> skeleton indices. Given names match by name. Keras auto names
    (``conv2d_3``) are numbered per class in creation order, session-wide: a class's auto names
    match by name when the skeleton has them all, else by rank of their number when the counts
    agree (a file saved after other layers were built in its session: ``conv2d_2`` -> ``conv2d``;
    recorded in ``renamed``), else raise NoFit; never by position in the model's layer order."""
    by_name = _by_name(skel)
    auto = _auto_indices(skel)
    out: dict[str, int] = {}
    pending: dict[str, list[str]] = {}
    for n in raw_names:
        base = re.sub(r"_\d+$", "", n)
        if base in auto:
            pending.setdefault(base, []).append(n)
        elif n in by_name:
            out[n] = by_name[n]
        else:
            raise NoFit(n)
    for base, names in pending.items():
        out.update(_match_auto_names(base, names, auto[base], skel, renamed))
    return out


def _auto_indices(skel: list[LayerSkeleton]) -> dict[str, list[int]]:
    """Auto-name base -> the skeleton's auto-named layers of that class, by number."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(skel):
        if is_auto_name(s.name, s.class_name):
            out.setdefault(snake_case(s.class_name), []).append(i)
    return {b: sorted(idx, key=lambda i: auto_number(skel[i].name)) for b, idx in out.items()}


def _match_auto_names(
    base: str,
    names: list[str],
    indices: list[int],
    skel: list[LayerSkeleton],
    renamed: dict[str, str] | None,
) -> dict[str, int]:
    """One class's auto names from a file -> skeleton indices: by name, or by number rank."""
    by_name = {skel[i].name: i for i in indices}
    if all(n in by_name for n in names):
        return {n: by_name[n] for n in names}
    if len(names) != len(indices):
        raise NoFit(f"{len(names)} {base} layers in the file, {len(indices)} in the model")
    out = dict(zip(sorted(names, key=auto_number), indices))
    if renamed is not None:
        renamed.update({n: skel[i].name for n, i in out.items() if n != skel[i].name})
    return out


def _group_of(key: str) -> str:
    """``layers/<group>/vars/<i>`` -> ``<group>`` (``functional/layers/conv2d`` inside a nested
    model; ``lstm`` for a sublayer's ``layers/lstm/cell/vars/0``)."""
    return _split_group(key)[0]


def _split_group(key: str) -> tuple[str, str]:
    """(layer group, sublayer path) of a ``.weights.h5`` key: ``layers/lstm/cell/vars/0`` ->
    (``lstm``, ``cell``); ``layers/conv2d/vars/0`` -> (``conv2d``, ``"``)."""
    parts = key[len("layers/") : key.rindex("/vars/")].split("/")
    group, i = parts[0], 1
    while i + 1 < len(parts) and parts[i] == "layers":
        group, i = f"{group}/layers/{parts[i + 1]}", i + 2
    return group, "/".join(parts[i:])


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
        own = [k for k in keys if not _split_group(k)[1]]
        out.update(_sublayer_vars(skel[i], i, [k for k in keys if k not in own]))
        if not own:
            continue
        names = var_names(skel[i].class_name, skel[i].config, len(own))
        if names is None:
            if skel[i].shapes and len(skel[i].shapes) == len(own):
                names = [v for v, _ in skel[i].shapes]
            else:
                raise NoFit(f"{g}: cannot name {len(own)} variables of {skel[i].class_name}")
        for key in sorted(own, key=lambda k: int(k.rsplit("/", 1)[1])):
            out[key] = (i, names[int(key.rsplit("/", 1)[1])])
    return out


def _sublayer_vars(s: LayerSkeleton, i: int, keys: list[str]) -> dict[str, tuple[int, str]]:
    """Names of a layer's sublayer variables (an LSTM's ``cell``, a Bidirectional's
    ``forward_layer/cell``), or NoFit when the class has no such sublayer."""
    out = {}
    for key in keys:
        sub, index = _split_group(key)[1], int(key.rsplit("/", 1)[1])
        name = sub_var_name(s.class_name, s.config, sub, index)
        if name is None:
            raise NoFit(f"{key}: {s.class_name} has no variable {index} in sublayer {sub!r}")
        out[key] = (i, name)
    return out


def _match_scoped(
    names: dict[str, tuple[str, str]],
    skel: list[LayerSkeleton],
    auto: bool = False,
    renamed: dict[str, str] | None = None,
) -> dict[str, int]:
    """Item -> skeleton index, for items given as (scope, layer name): names are matched within
    their scope (the model's own layers, or the nested model's); ``auto``: by Keras auto name
    (the ``.weights.h5`` group keys: numbered per class in the model's layer order)."""
    out: dict[str, int] = {}
    for scope in sorted({sc for sc, _ in names.values()}):
        sub = [i for i, s in enumerate(skel) if s.scope == scope]
        items = {k: n for k, (sc, n) in names.items() if sc == scope}
        if auto:
            index = _auto_names([skel[i] for i in sub])
            out.update({k: sub[index[n]] for k, n in items.items() if n in index})
        else:
            index = match_layer_names(sorted(set(items.values())), [skel[i] for i in sub], renamed)
            out.update({k: sub[index[n]] for k, n in items.items()})
    return out


def match_scoped_layers(
    layers: list[SourceLayer], skel: list[LayerSkeleton], bases: tuple[str, str] = ("", "")
) -> dict[str, int]:
    """Source layer name -> skeleton index, each layer matched among the skeleton's layers of its
    scope (what the Keras runner loads weights with). ``bases``: (the source's nested base, the
    skeleton's): a rebuilt model names its nested base its own way."""
    src, live = bases

    def scope(lay: SourceLayer) -> str:
        if src and within(lay.scope, src):
            return live + lay.scope[len(src) :]
        return lay.scope

    return _match_scoped({lay.name: (scope(lay), lay.name) for lay in layers}, skel)


def _scope_of_path(parts: list[str], skel: list[LayerSkeleton], what: str) -> str:
    """The skeleton scope of a file path's nested-model parts, each a nested model's name or its
    Keras auto name among its siblings (``sequential_1``, what a ``.weights.h5`` path says)."""
    scope = ""
    for part in parts:
        children = {
            path.rsplit("/", 1)[-1]: (path, cls)
            for path, cls in getattr(skel, "scopes", {}).items()
            if _parent(path) == scope and path != scope
        }
        auto = _block_auto_names({name: cls for name, (_, cls) in children.items()})
        name = part if part in children else auto.get(part)
        if name is None:
            raise NoFit(f"{what}: nested layers the model config does not have")
        scope = children[name][0]
    return scope


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


def _scope_holding(leaf: str, scope: str, skel: list[LayerSkeleton]) -> str:
    """``scope`` if it has a layer ``leaf``, else the one scope under it that has (a legacy
    ``.h5`` key names a nested model's layer by its build-time path, which may skip levels)."""
    found = {s.scope for s in skel if s.name == leaf and within(s.scope, scope)}
    if scope in found or len(found) != 1:
        return scope
    return found.pop()


@RESOLVERS.register("keras")
@RESOLVERS.register("weights.h5")
def _resolve_weights_h5(
    raw: RawCheckpoint, skel: list[LayerSkeleton]
) -> dict[str, tuple[int, str]]:
    names, keys = {}, {}
    for g in {_group_of(k) for k in raw.tensors}:
        *outer, leaf = g.split("/layers/")
        scope = _scope_of_path(outer, skel, g)
        names[g] = (scope, raw.group_names.get(g, leaf) if raw.group_names else leaf)
        keys[g] = (scope, leaf)
    renamed: dict[str, str] = {}
    index = _match_scoped(names, skel, auto=not raw.group_names, renamed=renamed)
    if renamed:
        _check_group_keys(index, _match_scoped(keys, skel, auto=True), names)
    return Assignment(_numbered_vars(raw, skel, index), renamed)


def _check_group_keys(
    by_name: dict[str, int], by_key: dict[str, int], names: dict[str, tuple[str, str]]
) -> None:
    """Renumbered auto names must land where the file's group keys (numbered per class in the
    model's layer order) say: two independent readings of the same file, or NoFit."""
    for g, i in by_name.items():
        if by_key.get(g, i) != i:
            raise NoFit(f"layers/{g} (named {names[g][1]}): name and group key disagree")


@RESOLVERS.register("h5")
def _resolve_legacy_h5(raw: RawCheckpoint, skel: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    """``[model_weights/]<layer>/<layer>/<var>``; a nested model's weights are
    ``model_weights/<nested model>/<its variables' paths: [<inner model>/...]<layer>/<var>>``."""
    scopes = getattr(skel, "scopes", {})
    names, var = {}, {}
    for k in raw.tensors:
        p = k.split("/")
        p = p[1:] if p[0] == "model_weights" else p
        if p[0] in scopes and len(p) > 2:
            scope = p[0]
            for part in p[1:-2]:
                scope = f"{scope}/{part}" if f"{scope}/{part}" in scopes else scope
            names[k] = (_scope_holding(p[-2], scope, skel), p[-2])
        else:
            names[k] = ("", p[0])
        var[k] = p[-1].split(":")[0]
    renamed: dict[str, str] = {}
    index = _match_scoped(names, skel, renamed=renamed)
    for k in raw.tensors:  # <bidirectional>/<forward_lstm>/<lstm_cell>/<var>
        if skel[index[k]].class_name == "Bidirectional":
            side = [d for d in ("forward", "backward") if f"/{d}_" in k]
            var[k] = f"{side[0]}/{var[k]}" if side else var[k]
    return Assignment({k: (index[k], var[k]) for k in raw.tensors}, renamed)


_OBJ = re.compile(
    r"^(?:.*/)?(?P<kind>_operations|layer_with_weights-|layer-)/?(?P<i>\d+)/(?P<attr>.+?)"
    r"/\.ATTRIBUTES/VARIABLE_VALUE$"
)
_FLAT = re.compile(r"^variables/(?P<i>\d+)/\.ATTRIBUTES/VARIABLE_VALUE$")  # model.variables order


@RESOLVERS.register("tf-checkpoint")
@RESOLVERS.register("savedmodel")
def _resolve_tf(raw: RawCheckpoint, skel: list[LayerSkeleton]) -> dict[str, tuple[int, str]]:
    """Object-based keys (Keras 3 ``_operations/<i>``, tf.keras 2 ``layer_with_weights-<j>``, a
    nested model's layers under its own index at any depth) or name-based ``<layer>/<var>`` (TF1;
    ``<block>/<layer>/<var>`` inside a nested block); SavedModel's flat list."""
    if raw.object_paths:
        return _resolve_object_paths(raw, skel)
    keys = list(raw.tensors)
    if all(_FLAT.match(k) for k in keys):
        return _resolve_flat(raw, skel)
    by_path = _object_paths(skel)
    out: dict[str, tuple[int, str]] = {}
    named = []
    for k in keys:
        m = _OBJ.match(k)
        if m:
            kind = m["kind"].rstrip("-")
            path = tuple(int(i) for i in re.findall(rf"{kind}-?/?(\d+)/", k))
            idx = by_path[kind].get(path, len(skel))
            if idx >= len(skel):
                raise NoFit(k)
            attr = m["attr"].split("/")[-1]
            out[k] = (idx, canonical_attr(skel[idx].class_name, attr))
        elif "/" in k and ".ATTRIBUTES" not in k:
            named.append(k)  # name-based (TF1): [<block>/]<layer>/<var>
        else:
            raise NoFit(k)
    if named:
        return _resolve_tf_names(named, skel, out)
    return out


def _resolve_tf_names(
    named: list[str], skel: list[LayerSkeleton], out: dict[str, tuple[int, str]]
) -> Assignment:
    """TF1 name-keyed ``[<block>/]<layer>/<var>``: layer names matched within their scope (a
    nested layer keyed by its own name alone: in the one scope that has it); a layer the config
    names by its whole variable scope (TF-slim's ``net/conv1/BatchNorm``) taken as it is."""
    scope_of: dict[str, str] = {}
    for s in skel:
        scope_of[s.name] = s.scope if scope_of.get(s.name, s.scope) == s.scope else ""
    top_level = {s.name for s in skel if not s.scope}
    names = {}
    for k in named:
        if k.rsplit("/", 1)[0] in top_level:  # a layer named by its whole variable scope (slim)
            names[k] = ("", k.rsplit("/", 1)[0])
            continue
        *scope, leaf, _ = k.split("/")
        where = _scope_of_path(scope, skel, k) if scope else scope_of.get(leaf, "")
        names[k] = (where, leaf)
    renamed: dict[str, str] = {}
    index = _match_scoped(names, skel, renamed=renamed)
    for k in named:
        var = k.rsplit("/", 1)[1].split(":")[0]
        out[k] = (index[k], canonical_attr(skel[index[k]].class_name, var))
    return Assignment(out, renamed)


def _object_paths(skel: list[LayerSkeleton]) -> dict[str, dict[tuple[int, ...], int]]:
    """Per object-key kind, the index path of each skeleton layer: ``_operations`` (manifest
    ``op_index``/``op_path``; without them, the model's layer order), ``layer_with_weights``
    (weighted layers in order, a nested block counting as one with its own numbering inside)
    and ``layer`` (every layer in order)."""
    ops: dict[tuple[int, ...], int] = {}
    for i, s in enumerate(skel):
        if s.op_path is not None:
            ops[s.op_path] = i
        elif s.op_index is not None and not s.scope:
            ops[(s.op_index,)] = i
    if not ops:
        ops = {(i,): i for i in range(len(skel))}
    return {
        "_operations": ops,
        "layer_with_weights": _weighted_paths(skel),
        "layer": {(i,): i for i in range(len(skel))},
    }


def _weighted_paths(skel: list[LayerSkeleton]) -> dict[tuple[int, ...], int]:
    """tf.keras 2 numbering: ``layer_with_weights-<j>`` over the model's weighted layers, a nested
    block one of them, its own weighted layers numbered inside it (``[j, k]``)."""
    out: dict[tuple[int, ...], int] = {}
    counts: dict[str, int] = {}  # scope -> weighted items numbered so far
    seen: dict[str, tuple[int, ...]] = {"": ()}  # scope -> its path
    for i, s in enumerate(skel):
        if not _n_vars(s):
            continue
        parts = s.scope.split("/") if s.scope else []
        for depth in range(len(parts)):
            scope, parent = "/".join(parts[: depth + 1]), "/".join(parts[:depth])
            if scope not in seen:
                seen[scope] = (*seen[parent], counts.get(parent, 0))
                counts[parent] = counts.get(parent, 0) + 1
        out[(*seen[s.scope], counts.get(s.scope, 0))] = i
        counts[s.scope] = counts.get(s.scope, 0) + 1
    return out


def _resolve_object_paths(
    raw: RawCheckpoint, skel: list[LayerSkeleton]
) -> dict[str, tuple[int, str]]:
    """Keys whose layer the file's object graph names (tf.keras 2.x SavedModel: a nested model's
    variables are often keyed ``variables/<i>``): matched by (nested model, layer name)."""
    paths = {k: raw.object_paths[k] for k in raw.tensors if k in raw.object_paths}
    missing = [k for k in raw.tensors if k not in paths]
    if missing:
        raise NoFit(f"{missing[0]}: no layer in the file's object graph holds it")
    index = _match_scoped({k: (scope, layer) for k, (scope, layer, _) in paths.items()}, skel)
    return {
        k: (index[k], canonical_attr(skel[index[k]].class_name, v)) for k, (*_, v) in paths.items()
    }


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
    file_names = {new: old for old, new in getattr(assignment, "renamed", {}).items()}
    for s, lay in zip(skel, layers):
        lay.file_name = file_names.get(s.name, "")
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
        found = _described(raw, layers, manifests, heads, "model", skel)
        found.source_model_config = source_model.get("model_config")
        return found
    if raw.model_config is not None:
        skel = skeleton_from_config(raw.model_config, raw.path)
        try:
            layers = build_layers(raw, skel, "file")
        except NoFit as exc:
            raise SourceFormatError(
                f"{raw.path}: weights do not match the file's own model config ({exc})"
            ) from None
        return _described(raw, layers, manifests, heads, "file", skel)
    have = Counter(shape_key(t.shape) for t in raw.tensors.values())
    for n, man in enumerate(manifests):
        if not may_fit(have, man, heads.get(man["id"])):
            continue
        found = _fit_manifest(raw, man, heads.get(man["id"]))
        if found is not None:
            return _disambiguated(raw, found, man, manifests[n + 1 :], heads)
    if raw.fallback_config is not None:  # layers inferred from variable names (TF1 checkpoints)
        skel = skeleton_from_config(raw.fallback_config, raw.path)
        try:
            layers = build_layers(raw, skel, "variable names")
        except NoFit as exc:
            raise SourceFormatError(f"{raw.path}: cannot group its variables ({exc})") from None
        raw.notes += raw.fallback_config.get("notes", [])
        return _described(raw, layers, [], heads, "variable names", None)
    raise UnknownArchitectureError(
        f"{raw.path} ({raw.format}, {len(raw.tensors)} tensors) stores no model config and matches"
        f" no known architecture ({len(manifests)} tried); pass --source-model module:function that"
        " builds the Keras model, or --mapping with a table for it"
    )


def may_fit(have: Counter[str], man: Any, spec: HeadSpec | None) -> bool:
    """Whether a file whose tensors have the shapes counted in ``have`` can hold this shipped
    architecture at all, its classifier aside (stock, re-headed, headless or nested, it holds
    every other variable at the manifest's shape): a cheap test from the file's layout, before
    the full fit."""
    need = Counter(
        shape
        for name, shapes in weighted_layers(man)
        if not (spec and spec.is_top(name))
        for shape in shapes
    )
    return not need - have


def computation_key(layers: list[Any]) -> list[tuple[str, str]]:
    """What a manifest's layers compute besides their weights: each layer's class and config (its
    name and the input layer aside). Two builds with the same weights can differ here
    (EfficientNetV2 with and without its Rescaling/Normalization)."""
    return [
        (
            lay.class_name,
            json.dumps({k: v for k, v in lay.config.items() if k != "name"}, sort_keys=True),
        )
        for lay in layers
        if lay.class_name != "InputLayer"
    ]


def _disambiguated(
    raw: RawCheckpoint,
    found: SourceModel,
    man: dict[str, Any],
    others: list[dict[str, Any]],
    heads: dict[str, HeadSpec],
) -> SourceModel:
    """``found`` (the file read as ``man``), unless the file fits later shipped architectures too
    that compute differently (the same weights, other layers or settings): then the one the file's
    own layer list names (a ``.weights.h5`` lists every layer), else a refusal naming them, what
    tells them apart and how to say which it is. Twins that compute the same are fine."""
    skel = skeleton_from_manifest(man)
    key, computes = structure_key(skel), computation_key(skel)
    fits = [(man["id"], skel, found)]
    have = Counter(shape_key(t.shape) for t in raw.tensors.values())
    for other_man in others:
        if not may_fit(have, other_man, heads.get(other_man["id"])):
            continue
        other = skeleton_from_manifest(other_man)
        if structure_key(other) != key or computation_key(other) == computes:
            continue
        fit = _fit_manifest(raw, other_man, heads.get(other_man["id"]))
        if fit is not None:
            fits.append((other_man["id"], other, fit))
    if len(fits) == 1:
        return found
    listed = _by_listed_layers(raw, fits)
    if listed is not None:
        return listed
    raise UnknownArchitectureError(
        f"{raw.path} ({raw.format}) stores no model config and fits"
        f" {', '.join(i for i, _, _ in fits)}: the same weights, computed differently"
        f" ({_difference(*fits[0][:2], *fits[1][:2])}); convert the model's .keras file"
        " (model.save) or pass --source-model module:function that builds it"
    )


def _by_listed_layers(
    raw: RawCheckpoint, fits: list[tuple[str, list[LayerSkeleton], SourceModel]]
) -> SourceModel | None:
    """The one candidate whose layer classes agree with the layers a ``.weights.h5`` lists (its
    group keys name every layer, weighted or not, by class: ``conv2d_3``), counted where the
    candidates differ."""
    if not raw.group_names or any("/" in g for g in raw.group_names):
        return None
    listed = Counter(re.sub(r"_\d+$", "", g) for g in raw.group_names)
    counts = [Counter(snake_case(s.class_name) for s in skel) for _, skel, _ in fits]
    differ = {c for cnt in counts for c in cnt if len({n[c] for n in counts}) > 1}
    keep = [f for f, cnt in zip(fits, counts) if all(cnt[c] == listed[c] for c in differ)]
    return keep[0][2] if len(keep) == 1 else None


def _difference(a_id: str, a: list[LayerSkeleton], b_id: str, b: list[LayerSkeleton]) -> str:
    """What two manifests with the same weights differ in: layers only one has, or the first
    layer configured differently."""
    names_a, names_b = {s.name for s in a}, {s.name for s in b}
    only_a = [s.name for s in a if s.name not in names_b and s.class_name != "InputLayer"]
    only_b = [s.name for s in b if s.name not in names_a and s.class_name != "InputLayer"]
    if only_a or only_b:
        return "; ".join(
            f"only {i} has {', '.join(names)}"
            for i, names in ((a_id, only_a), (b_id, only_b))
            if names
        )
    by_name = {s.name: s for s in b}
    for s in a:
        if s.class_name != "InputLayer" and computation_key([s]) != computation_key(
            [by_name[s.name]]
        ):
            return f"layer {s.name} is configured differently"
    return "their layers differ"


def _described(
    raw: RawCheckpoint,
    layers: list[SourceLayer],
    manifests: list[dict[str, Any]],
    heads: dict[str, HeadSpec],
    origin: str,
    skel: Skeleton,
) -> SourceModel:
    """A source resolved from a config (the file's or the user's model): its manifest, head,
    nesting (the application found by structure at any depth of nested models)."""
    have = Counter(shape_key(t.shape) for t in raw.tensors.values())
    manifests = [m for m in manifests if may_fit(have, m, heads.get(m["id"]))]
    scope, manifest_id = _application_scope(layers, skel, manifests, heads)
    nesting = None
    if scope:
        nesting = Nesting(skel.outer_class, scope, skel.scopes[scope], skel.training.get(scope))
    base = [lay for lay in layers if within(lay.scope, scope)]
    spec = heads.get(manifest_id) if manifest_id else None
    if manifest_id:
        man = next(m for m in manifests if m["id"] == manifest_id)
        _renumber_auto_names(raw, base, skeleton_from_manifest(man), spec, manifest_id)
    outer = [lay for lay in layers if not within(lay.scope, scope)] if nesting else base
    head = describe_head(outer, spec, nesting is not None, True)
    if manifest_id and head.kind == "headless" and head.pooling is None and not nesting:
        head.pooling = pooling_beyond_manifest(base, man)
    return SourceModel(raw, layers, manifest_id, origin, head, nesting)


def _application_scope(
    layers: list[SourceLayer],
    skel: Skeleton,
    manifests: list[dict[str, Any]],
    heads: dict[str, HeadSpec],
) -> tuple[str, str | None]:
    """(the nested models' path of the shipped application the source holds, its manifest id):
    the deepest nested model (or the model itself) whose layers match a manifest by structure.
    None matching: the model itself, or the first nested model of another class than Sequential
    (an application of the user's own, nested)."""
    scopes = sorted(getattr(skel, "scopes", {}), key=lambda sc: -sc.count("/"))
    candidates = [_manifest_key(man, heads) for man in manifests]
    for scope in [*scopes, ""]:
        base = [lay for lay in layers if within(lay.scope, scope)]
        found = _matching_manifest(base, candidates, heads)
        if found:
            return scope, found
    nested = [sc for sc, cls in getattr(skel, "scopes", {}).items() if cls != "Sequential"]
    return (nested[0] if nested and "/" not in nested[0] else ""), None


def _manifest_key(man: dict[str, Any], heads: dict[str, HeadSpec]) -> tuple[str, Any, Any]:
    skel = skeleton_from_manifest(man)
    spec = heads.get(man["id"])
    return man["id"], structure_key(skel, spec), _classes(skel)


def _renumber_auto_names(
    raw: RawCheckpoint,
    layers: list[SourceLayer],
    manifest: list[LayerSkeleton],
    spec: HeadSpec | None,
    manifest_id: str,
) -> None:
    """Give a source that matches a shipped architecture its canonical auto names (a model built
    after other layers in its session has ``conv2d_2`` where the architecture has ``conv2d``): the
    tables map by them. Renumbered per class by number (creation order); the weighted layers must
    then carry the architecture's names in its order, else the mapping by name cannot be trusted."""
    explicit = set(canonical_auto_names(manifest))  # look-alikes it names so (MobileNet reshape_2)
    renamed = canonical_auto_names([lay for lay in layers if lay.name not in explicit])
    got = [(renamed.get(lay.name, lay.name)) for lay in layers if lay.weights]
    got = [n for n in got if not (spec and spec.is_top(n))]
    want = [s.name for s in manifest if s.shapes and not (spec and spec.is_top(s.name))]
    wrong = [(g, w) for g, w in zip(got, want) if g != w]
    if wrong:
        raise UnknownArchitectureError(
            f"{raw.path}: matches {manifest_id} by structure, but its auto-named layers are not in"
            f" its order ({wrong[0][0]} where {wrong[0][1]} is expected, renumbered); the tables"
            " map by name: pass --source-model module:function, or --mapping with a table for it"
        )
    for lay in layers:
        if lay.name in renamed:
            lay.file_name, lay.name = lay.name, renamed[lay.name]
            lay.config = {**lay.config, "name": lay.name}


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
        lay.scope = f"{part.nesting.layer}/{lay.scope}" if lay.scope else part.nesting.layer
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
    candidates: list[tuple[str, Any, list[str]]],
    heads: dict[str, HeadSpec],
) -> str | None:
    """The shipped manifest whose weighted layers the source's match (``candidates``: each
    manifest's id, structure key and layer classes, see ``_manifest_key``); of several (the same
    weights, other layers: EfficientNetV2 without its preprocessing), the one whose layer classes
    agree with the source's longest from the input on."""
    found, keys = [], {}
    for manifest_id, key, classes in candidates:
        spec = heads.get(manifest_id)
        if spec not in keys:
            keys[spec] = structure_key(layers, spec)
        if key == keys[spec]:
            found.append((_common_prefix(classes, _classes(layers)), -len(found), manifest_id))
    return max(found)[2] if found else None


def _classes(layers: list[Any]) -> list[str]:
    return [lay.class_name for lay in layers if lay.class_name != "InputLayer"]


def _common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


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
                    out.append(source_manifest(variant.source))
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
    known = {man["id"] for man in manifests}
    manifests += [man for man in refused_manifests() if man["id"] not in known]  # tried last
    model_manifest = _source_model_manifest(source_model) if source_model else None
    heads = {**refusal_heads(), **head_specs(tables)}  # refused sources re-headed/nested too
    return resolve(raw, manifests, model_manifest, heads)


def rebind(source: SourceModel, raw: RawCheckpoint) -> SourceModel:
    """``source`` (resolved from a file of the same structure as ``raw``: every tensor key, shape
    and dtype, the config, group names, ignored keys and notes as read) resolved on ``raw``
    instead, without resolving again: the same layers, configs, manifest, head and nesting, each
    variable bound to ``raw``'s tensor of the same key; what resolution added to the raw checkpoint
    (keys it ignored, notes) added to ``raw`` likewise. What a batch conversion does for each file
    after the first of a structure (converter.batch)."""
    layers = []
    for lay in source.layers:
        missing = [key for key in lay.keys.values() if key not in raw.tensors]
        if missing:
            raise SourceFormatError(
                f"{raw.path} has no tensor {missing[0]!r} (layer {lay.name!r}), which the file"
                f" {source.raw.path} of its structure has; it is not the same structure"
            )
        weights = {var: raw.tensors[key] for var, key in lay.keys.items()}
        layers.append(dataclasses.replace(lay, weights=weights, keys=dict(lay.keys), _held=None))
    for key, why in source.raw.ignored.items():
        raw.ignored.setdefault(key, why)
    raw.notes += source.raw.notes[len(raw.notes) :]
    head, nesting = copy.deepcopy(source.head), copy.deepcopy(source.nesting)
    return dataclasses.replace(source, raw=raw, layers=layers, head=head, nesting=nesting)


def fill_bn_momentum(source: SourceModel, momentum: float) -> list[str]:
    """Give the BatchNorm layers whose momentum the file does not record ``momentum`` (the user's
    ``--source-bn-momentum``); the layers filled, also in the source's notes."""
    if not 0.0 <= momentum < 1.0:
        raise ConverterError(
            f"--source-bn-momentum {momentum} is not in [0, 1) (Keras' convention)"
        )
    filled = []
    for lay in source.layers:
        if lay.class_name == "BatchNormalization" and lay.config.get("momentum", 0) is None:
            lay.config = {**lay.config, "momentum": momentum}
            filled.append(lay.name)
    source.raw.notes.append(
        f"--source-bn-momentum {momentum}: set on {len(filled)} BatchNorm layers"
        + ("" if filled else " (none: the file records every momentum; the flag was not used)")
    )
    return filled


def _source_model_manifest(spec: str) -> dict[str, Any]:
    from .manifest import source_manifest_from_model
    from .model import call_factory, prefer_torch_first

    prefer_torch_first()  # the factory imports Keras; a PyTorch target is built after it

    model = call_factory(spec, "--source-model")
    manifest = source_manifest_from_model(model, f"model:{spec}")
    manifest["model_config"] = model_config_of(model)
    return manifest


def model_config_of(model: Any) -> dict[str, Any] | None:
    """A live Keras model's config as ``model.save`` stores it (layers with their inbound nodes),
    JSON-clean; None when Keras cannot serialize it."""
    import keras

    try:
        return json.loads(json.dumps(keras.saving.serialize_keras_object(model), default=str))
    except Exception:  # a subclassed model without get_config: no graph, not an error here
        return None
