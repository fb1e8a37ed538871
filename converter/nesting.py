"""Heads and nested models on the source side.

A keras.applications model reaches us in three shapes besides the stock 1000-class one: re-headed
(``classes=N``), headless (``include_top=False``, optionally pooled), or nested as one layer of the
user's model (``Sequential([base, GAP, Dropout, Dense(N)])``, ``base(inputs, training=False)``).
This module holds what those shapes have in common: which source layers are the head (table
``[head]`` data), the manifest skeletons a config-less file may fit (full, any class count,
headless), how each format stores a nested model (``split_nested``), and the description of a
source's head and nesting that ``convert`` and ``inspect`` report.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .formats import RawCheckpoint, RawTensor
from .keras_layers import KERAS_LAYERS, canonical_attr
from .registry import Registry

POOLING_CLASSES = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}
# layers of the user's model that may sit between the base and one Dense classifier
PLAIN_OUTER_CLASSES = {"InputLayer", "Dropout", "Flatten", *POOLING_CLASSES}
UNWEIGHTED_CLASSES = [
    "InputLayer",
    "Dropout",
    "Flatten",
    "Activation",
    "Functional",
    "Sequential",
    *POOLING_CLASSES,
]


@dataclass(frozen=True)
class HeadSpec:
    """A table's ``[head]``: ``source`` the classifier layer, ``top`` the other weighted layers only
    ``include_top=True`` builds have (MobileNetV3's ``conv_2``)."""

    source: str
    top: str | None = None

    def is_top(self, name: str) -> bool:
        return _top_pattern(self.source, self.top).fullmatch(name) is not None

    def is_classifier(self, name: str) -> bool:
        return _top_pattern(self.source, None).fullmatch(name) is not None


@lru_cache(maxsize=None)
def _top_pattern(source: str, top: str | None) -> re.Pattern[str]:
    """The compiled pattern of a head's classifier (and other top layers): detection asks every
    layer of every candidate manifest."""
    return re.compile(source if not top else f"(?:{source})|(?:{top})")


@dataclass
class Nesting:
    """The application is one layer of the user's ``outer_class`` model (``layer``: the path of
    nested models to it, ``features/resnet50`` when nested two levels deep); ``training``: the
    base is called with ``training=False`` (its BN frozen while fine-tuning) when False."""

    outer_class: str
    layer: str
    layer_class: str = "Functional"
    training: bool | None = None

    def report(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for people; says so where the format does not store a name or class."""
        *path, name = self.layer.split("/")
        if self.layer == "?":
            base = "a layer (name not stored in this format)"
        elif path and not self.layer.startswith("_operations"):
            base = f"layer {name!r} of the nested model {'/'.join(path)!r}"
        else:
            base = f"layer {self.layer!r}"
        outer = (
            f"{self.outer_class} model"
            if self.outer_class != "unknown"
            else "model (its class is not stored in this format)"
        )
        frozen = (
            "; called with training=False (BN frozen while fine-tuning)"
            if self.training is False
            else ""
        )
        return f"the base is {base} of the user's {outer}{frozen}"


@dataclass
class Head:
    """What the source ends with: ``classifier`` (``num_classes`` outputs over ``features``),
    ``headless`` (features, ``pooling`` avg/max/None, or ``unknown`` when the file cannot tell) or
    ``user`` (a head of the user's own beyond one Dense: ``layers``)."""

    kind: str
    num_classes: int | None = None
    features: int | None = None
    pooling: str | None = None
    layers: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        if self.kind == "classifier":
            return f"classifier, {self.num_classes} classes ({', '.join(self.layers)})"
        if self.kind == "headless":
            return f"headless, pooling {self.pooling or 'none (feature map)'}"
        return f"user head: {', '.join(self.layers)}"


# ------------------------------------------------------------------ manifest skeleton variants


def skeleton_modes(skel: list[Any], spec: HeadSpec | None) -> list[tuple[str, list[Any]]]:
    """The shapes a config-less file of this architecture may have: ``full`` (the manifest),
    ``classes`` (any class count: the classifier's last dimension free), ``headless`` (no top
    layers: their variables removed, and the flat variable order without them)."""
    if spec is None:
        return [("full", skel)]
    top = {i for i, s in enumerate(skel) if s.shapes and spec.is_top(s.name)}
    if not top:
        return [("full", skel)]
    classes = _copy_skeleton(skel)
    for s in classes:
        if s.shapes and spec.is_classifier(s.name):
            s.shapes = [(v, shape[:-1] + (None,)) for v, shape in s.shapes]
    headless = _copy_skeleton(skel)
    for i in top:
        headless[i].shapes = []
    if getattr(skel, "flat", None) is not None:
        headless.flat = _flat_without(skel.flat, top)
    return [("full", skel), ("classes", classes), ("headless", headless)]


def _copy_skeleton(skel: list[Any]) -> list[Any]:
    out = type(skel)(dataclasses.replace(s) for s in skel)
    for attr in ("flat", "nesting"):
        if hasattr(skel, attr):
            setattr(out, attr, getattr(skel, attr))
    return out


def _flat_without(flat: list[tuple[int, str]], removed: set[int]) -> list[tuple[int, str]]:
    """The flat variable order without ``removed`` layers; state that is no layer's weight
    (a Dropout seed) after the first removed variable belongs to the removed top too."""
    out, past_top = [], False
    for i, name in flat:
        past_top = past_top or i in removed
        if i in removed or (i < 0 and past_top):
            continue
        out.append((i, name))
    return out


def shapes_fit(got: dict[str, tuple], want: dict[str, tuple]) -> bool:
    """File shapes against manifest shapes, where a manifest dimension None matches any size."""
    if set(got) != set(want):
        return False
    for var, shape in want.items():
        g = got[var]
        if len(g) != len(shape) or any(w is not None and w != d for d, w in zip(g, shape)):
            return False
    return True


# ------------------------------------------------------------------ nested files without a config


@dataclass
class OuterLayer:
    """A layer of the user's model around the base, as a config-less file shows it."""

    name: str
    class_name: str
    weights: dict[str, RawTensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Split:
    """A nested file cut in two: ``inner`` reads as a plain file of the base (keys rewritten,
    ``original`` maps them back), ``outer`` the user's layers; ``sees_unweighted`` says whether
    layers without weights (the pooling) are visible in this format."""

    inner: RawCheckpoint
    original: dict[str, str]
    outer: list[OuterLayer]
    nesting: Nesting
    sees_unweighted: bool
    ignored: dict[str, str] = field(default_factory=dict)  # file keys that are no layer's weight


Splitter = Callable[[RawCheckpoint, int | None], Split | None]
SPLITTERS: Registry[Splitter] = Registry("nested-model splitter")


def split_nested(raw: RawCheckpoint, n_inner: int | None = None) -> Split | None:
    """The file cut into base and user's layers, or None when it is not a nested model: a model
    nested in a model nested in the user's is cut level by level, the user's layers of every level
    kept (inner levels first). ``n_inner``: for files numbered only by variable order
    (SavedModel), the base's count."""
    if raw.format not in SPLITTERS:
        return None
    split = SPLITTERS.get(raw.format)(raw, n_inner)
    deeper = split_nested(split.inner, n_inner) if split and n_inner is None else None
    return _stacked(split, deeper) if deeper else split


def _stacked(outer: Split, inner: Split) -> Split:
    """Two levels of nesting as one: the base of ``inner``, the user's layers of both levels."""
    original = {k: outer.original.get(v, v) for k, v in inner.original.items()}
    for lay in inner.outer:
        lay.keys = {var: outer.original.get(k, k) for var, k in lay.keys.items()}
    ignored = {outer.original.get(k, k): why for k, why in inner.ignored.items()}
    nesting = dataclasses.replace(
        outer.nesting,
        layer=f"{outer.nesting.layer}/{inner.nesting.layer}",
        layer_class=inner.nesting.layer_class,
    )
    return Split(
        inner.inner,
        original,
        inner.outer + outer.outer,
        nesting,
        outer.sees_unweighted and inner.sees_unweighted,
        {**outer.ignored, **ignored},
    )


def _inner_raw(raw: RawCheckpoint, tensors: dict[str, RawTensor], **extra: Any) -> RawCheckpoint:
    return dataclasses.replace(raw, tensors=tensors, ignored={}, model_config=None, **extra)


def _class_of_auto_name(name: str) -> str:
    from .source import snake_case

    base = re.sub(r"_\d+$", "", name)
    for cls in [*KERAS_LAYERS, *UNWEIGHTED_CLASSES]:
        if snake_case(cls) == base:
            return cls
    return "Unknown"


@SPLITTERS.register("weights.h5")
def _split_weights_h5(raw: RawCheckpoint, n_inner: int | None) -> Split | None:
    """``layers/<nested auto name>/layers/<inner auto name>/vars/<i>``; the user's layers are the
    other top-level groups (all of them listed, weighted or not)."""
    nested = {g.split("/layers/")[0] for g in raw.group_names if "/layers/" in g}
    if len(nested) != 1 or any(n.endswith("/layers") for n in nested):
        return None
    (scope,) = nested
    prefix = f"layers/{scope}/layers/"
    inner, original = {}, {}
    for key, tensor in raw.tensors.items():
        if key.startswith(prefix):
            new = "layers/" + key[len(prefix) :]
            inner[new], original[new] = tensor, key
    names = {
        g[len(scope) + 8 :]: n
        for g, n in raw.group_names.items()
        if g.startswith(scope + "/layers/")
    }
    outer = []
    for group, name in sorted(raw.group_names.items()):
        if "/" in group or group == scope:
            continue
        lay = OuterLayer(name, _class_of_auto_name(group))
        for key in sorted(k for k in raw.tensors if k.startswith(f"layers/{group}/vars/")):
            var = _outer_var_name(lay.class_name, int(key.rsplit("/", 1)[1]))
            lay.weights[var], lay.keys[var] = raw.tensors[key], key
        outer.append(lay)
    nesting = Nesting("unknown", raw.group_names.get(scope, scope), _class_of_auto_name(scope))
    return Split(_inner_raw(raw, inner, group_names=names), original, outer, nesting, True)


def _outer_var_name(class_name: str, index: int) -> str:
    if class_name in KERAS_LAYERS:
        names = KERAS_LAYERS.get(class_name).names({})
        if index < len(names):
            return names[index]
    return str(index)


_OPS = re.compile(r"_operations/(\d+)/")


@SPLITTERS.register("tf-checkpoint")
def _split_tf(raw: RawCheckpoint, n_inner: int | None) -> Split | None:
    """``model/[_functional/]_operations/<outer>/_operations/<inner>/<attr>/...``; the user's
    weighted layers are ``_operations/<outer>/<attr>`` (a Sequential keeps its graph under
    ``_functional``)."""
    depth = {k: len(_OPS.findall(k)) for k in raw.tensors}
    if not any(d >= 2 for d in depth.values()):
        return None
    inner, original, by_op = {}, {}, {}
    nested_ops = set()
    for key, tensor in raw.tensors.items():
        ops = _OPS.findall(key)
        if len(ops) >= 2:
            new = "model/_operations/" + key.split("/_operations/", 2)[2]
            inner[new], original[new] = tensor, key
            nested_ops.add(ops[0])
        elif len(ops) == 1:
            by_op.setdefault(int(ops[0]), []).append(key)
    if len(nested_ops) != 1:
        return None
    outer = [_tf_outer_layer(raw, keys) for _, keys in sorted(by_op.items())]
    _auto_name(outer)
    outer_class = "Sequential" if any("/_functional/" in k for k in raw.tensors) else "Functional"
    nesting = Nesting(outer_class, f"_operations/{nested_ops.pop()}")
    return Split(_inner_raw(raw, inner), original, outer, nesting, False)


def _tf_outer_layer(raw: RawCheckpoint, keys: list[str]) -> OuterLayer:
    attrs = {k: k.split("/.ATTRIBUTES")[0].rsplit("/", 1)[1] for k in keys}
    names = {canonical_attr("Dense", a) for a in attrs.values()}
    cls = _class_by_vars(names, [raw.tensors[k] for k in keys])
    lay = OuterLayer("", cls)
    for key, attr in attrs.items():
        var = canonical_attr(cls, attr) if cls in KERAS_LAYERS else attr
        lay.weights[var], lay.keys[var] = raw.tensors[key], key
    return lay


def _class_by_vars(names: set[str], tensors: list[RawTensor]) -> str:
    """A weighted layer's class from its variable names (and the kernel's rank)."""
    if {"gamma", "beta", "moving_mean", "moving_variance"} <= names:
        return "BatchNormalization"
    if "kernel" in names:
        rank = max(len(t.shape) for t in tensors)
        return {2: "Dense", 4: "Conv2D"}.get(rank, "Unknown")
    return "Unknown"


def _auto_name(layers: list[OuterLayer]) -> None:
    from .source import snake_case

    counts: dict[str, int] = {}
    for lay in layers:
        base = snake_case(lay.class_name)
        n = counts.get(base, 0)
        counts[base] = n + 1
        lay.name = lay.name or (base if n == 0 else f"{base}_{n}")


@SPLITTERS.register("savedmodel")
def _split_flat(raw: RawCheckpoint, n_inner: int | None) -> Split | None:
    """``variables/<i>`` in the outer model's order: the base's ``n_inner`` variables, then the
    user's: (kernel, bias) pairs are Dense layers, four equal vectors a BatchNormalization, integer
    vectors Dropout seed state (ignored)."""
    if n_inner is None:
        return None
    order = sorted(raw.tensors, key=lambda k: int(k.split("/")[1]))
    if not 0 < n_inner < len(order):
        return None
    inner = {k: raw.tensors[k] for k in order[:n_inner]}
    tail = [k for k in order[n_inner:] if raw.tensors[k].dtype.startswith("float")]
    ignored = {
        k: "not a layer weight (a Dropout seed generator state)"
        for k in order[n_inner:]
        if k not in tail
    }
    outer = _flat_outer_layers(raw, tail)
    if outer is None:
        return None
    _auto_name(outer)
    return Split(
        _inner_raw(raw, inner),
        {k: k for k in inner},
        outer,
        Nesting("unknown", "?"),
        False,
        ignored,
    )


def _flat_outer_layers(raw: RawCheckpoint, keys: list[str]) -> list[OuterLayer] | None:
    out, i = [], 0
    while i < len(keys):
        shapes = [tuple(raw.tensors[k].shape) for k in keys[i : i + 4]]
        if len(shapes) >= 2 and len(shapes[0]) == 2 and shapes[1] == shapes[0][1:]:
            names, cls = ["kernel", "bias"], "Dense"
        elif len(shapes) == 4 and len(set(shapes)) == 1 and len(shapes[0]) == 1:
            names, cls = ["gamma", "beta", "moving_mean", "moving_variance"], "BatchNormalization"
        else:
            return None
        lay = OuterLayer("", cls)
        for var, key in zip(names, keys[i : i + len(names)]):
            lay.weights[var], lay.keys[var] = raw.tensors[key], key
        out.append(lay)
        i += len(names)
    return out


# ------------------------------------------------------------------ describing the head


def describe_head(
    layers: list[Any], spec: HeadSpec | None, outer_only: bool, sees_unweighted: bool
) -> Head:
    """The source's head. ``layers``: the model's layers (``outer_only``: only the user's layers
    around a nested base); ``sees_unweighted``: whether layers without weights are known."""
    if outer_only:
        return _outer_head(layers, sees_unweighted)
    classifier = [lay for lay in layers if lay.weights and spec and spec.is_classifier(lay.name)]
    if classifier:
        kernel = classifier[0].weights.get("kernel")
        n = int(kernel.shape[-1]) if kernel is not None else None
        return Head(
            "classifier",
            n,
            int(kernel.shape[-2]) if kernel is not None else None,
            None,
            [lay.name for lay in classifier],
        )
    return Head("headless", pooling=_pooling(layers, sees_unweighted))


def _pooling(layers: list[Any], sees_unweighted: bool) -> str | None:
    """avg/max from the layers after the last weighted one; ``unknown`` when the file cannot say."""
    if not sees_unweighted:
        return "unknown"
    last = max((i for i, lay in enumerate(layers) if lay.weights), default=-1)
    for lay in layers[last + 1 :]:
        if lay.class_name in POOLING_CLASSES:
            return POOLING_CLASSES[lay.class_name]
    return None


def _outer_head(layers: list[Any], sees_unweighted: bool) -> Head:
    weighted = [lay for lay in layers if lay.weights]
    others = [
        lay for lay in layers if not lay.weights and lay.class_name not in PLAIN_OUTER_CLASSES
    ]
    pooling = _pooling([lay for lay in layers if not lay.weights], sees_unweighted)
    if not weighted and not others:
        return Head("headless", pooling=pooling)
    if len(weighted) == 1 and not others and weighted[0].class_name == "Dense":
        kernel = weighted[0].weights["kernel"]
        return Head(
            "classifier", int(kernel.shape[1]), int(kernel.shape[0]), pooling, [weighted[0].name]
        )
    named = [lay.name for lay in layers if lay.class_name not in ("InputLayer",)]
    return Head(
        "user",
        pooling=pooling,
        layers=[
            f"{n} ({c})"
            for n, c in ((lay.name, lay.class_name) for lay in layers if lay.name in named)
        ],
    )


def training_flag(entry: dict[str, Any]) -> bool | None:
    """``training`` as the outer functional config calls the nested layer (None: not stated)."""
    for node in entry.get("inbound_nodes") or []:
        if isinstance(node, dict) and "training" in (node.get("kwargs") or {}):
            value = node["kwargs"]["training"]
            return None if value is None else bool(value)
    return None


def pooling_from_groups(raw: RawCheckpoint, skel: list[Any]) -> str | None:
    """A config-less ``.weights.h5`` still names every layer's group by its class (auto names):
    a headless build's pooling shows as a GlobalMaxPooling2D group, or as one GlobalAveragePooling2D
    more than the architecture has up to its last weighted layer; ``unknown`` without group names.
    """
    if not raw.group_names:
        return "unknown"
    classes = [_class_of_auto_name(g) for g in raw.group_names if "/" not in g]
    if "GlobalMaxPooling2D" in classes:
        return "max"
    last = max((i for i, s in enumerate(skel) if s.shapes), default=-1)
    in_base = sum(1 for s in skel[: last + 1] if s.class_name == "GlobalAveragePooling2D")
    return "avg" if classes.count("GlobalAveragePooling2D") > in_base else None


def pooling_beyond_manifest(layers: list[Any], manifest: dict[str, Any]) -> str | None:
    """A headless build's pooling where it sits before the last weighted layer (ConvNeXt's
    include_top=False: the pooling, then a LayerNormalization): a global pooling layer that the
    architecture's manifest does not have; None when there is none."""
    have = Counter(lay.class_name for lay in layers if lay.class_name in POOLING_CLASSES)
    have.subtract(lay["class_name"] for lay in manifest["layers"])
    return next((POOLING_CLASSES[cls] for cls, n in have.items() if n > 0), None)
