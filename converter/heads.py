"""Classifier head reset: drop the source classifier, give the target a fresh head initialised the
architecture's own way (the head of a freshly constructed target model with ``num_classes=N``:
timm's and torchvision's constructors run their init schemes), never a bare ``nn.Linear`` default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import MappingError, UnsupportedLayerError
from .registry import Registry


@dataclass
class HeadPlan:
    num_classes: int
    source: re.Pattern[str]
    module: str
    target: str
    seed: int = 0
    fresh_keys: list[str] = field(default_factory=list)
    dropped_layers: list[str] = field(default_factory=list)
    surgeries: list[dict[str, Any]] = field(default_factory=list)  # the target's, before its init
    init_kwargs: dict[str, Any] = field(default_factory=dict)  # table [head] init_kwargs

    @property
    def target_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def drops(self, layer: Any) -> bool:
        if self.source.fullmatch(layer.name):
            self.dropped_layers.append(layer.name)
            return True
        return False

    def fresh_tensors(
        self, target_manifest: dict[str, Any], kwargs: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        import torch

        from .model import build_target

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_target(self.target, **{**kwargs, **self.init_kwargs})
        from .surgeries import apply_surgeries

        apply_surgeries(model, self.surgeries)
        sd = model.state_dict()
        self.fresh_keys = [k for k in sd if k.startswith(self.module + ".")]
        if not self.fresh_keys:
            raise MappingError(
                f"head module {self.module!r} has no tensors in {self.target}; fix the table's"
                " [head]"
            )
        return {k: sd[k].detach().numpy().copy() for k in self.fresh_keys}

    def report(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "dropped_source_layers": self.dropped_layers,
            "module": self.module,
            "fresh_keys": self.fresh_keys,
            "init": (
                f"{self.target} constructor init with num_classes={self.num_classes}, torch seed"
                f" {self.seed}"
            ),
        }


def head_plan(table: Any, variant: Any, num_classes: int) -> HeadPlan:
    if num_classes < 1:
        raise MappingError(f"num_classes must be >= 1, got {num_classes}")
    if not table.head:
        raise MappingError(
            f"table {table.id} declares no [head]; --num-classes is not available for it"
        )
    return HeadPlan(
        num_classes,
        re.compile(table.head["source"]),
        table.head["module"],
        variant.target,
        init_kwargs=dict(table.head.get("init_kwargs", {})),
    )


# ------------------------------------------------------------------ the source's own head (issue 8)


@dataclass
class SourceHeadPlan:
    """How the target takes the source's head: constructor kwargs, named surgeries (recorded, so
    ``load_model`` rebuilds them), extra rules (the user's Dense -> the target classifier), and
    notes for the user."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    surgeries: list[dict[str, Any]] = field(default_factory=list)
    rules: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# Per target library: (kwargs, surgeries) for a target ending in pooled features (``pooling``
# avg/max/None) with no classifier (``classifier`` None) or the given classifier size.
Pooled = Callable[
    [dict[str, Any], str | None, int | None], tuple[dict[str, Any], list[dict[str, Any]]]
]
POOLED: Registry[Pooled] = Registry("head policy (target library)")


@POOLED.register("timm")
def _timm_pooled(head: dict[str, Any], pooling: str | None, classes: int | None):
    """timm: ``num_classes=0`` (no classifier) and ``global_pool`` avg/max/'' (feature map)."""
    return {"num_classes": classes or 0, "global_pool": pooling or ""}, []


@POOLED.register("torchvision")
def _torchvision_pooled(head: dict[str, Any], pooling: str | None, classes: int | None):
    """torchvision: the classifier replaced by identity (surgery), max pooling by surgery on the
    ``[head] pool`` module (default ``avgpool``); no feature-map output (torchvision flattens)."""
    if pooling is None:
        raise UnsupportedLayerError(
            "a Keras model without pooling outputs a feature map; torchvision targets flatten after"
            " their pooling: convert to a timm target (--to timm:...) for a feature-map output"
        )
    surgeries = [] if classes else [{"name": "identity", "args": {"modules": [head["module"]]}}]
    if pooling == "max":
        surgeries.append(
            {"name": "global_max_pool", "args": {"module": head.get("pool", "avgpool")}}
        )
    return ({"num_classes": classes} if classes else {}), surgeries


POOLINGS = ("avg", "max", "none")


def source_head_plan(
    source: Any, table: Any, variant: Any, pooling: str | None = None
) -> SourceHeadPlan:
    """The target's head for ``source.head``: re-headed (``classes=N``), headless (pooling honoured)
    or nested with one Dense (mapped into the table's ``[head]`` module); a richer user head is
    refused, naming its layers. ``pooling`` (avg/max/none): the user's word, for files that do not
    record it (TF checkpoints, SavedModels)."""
    head = source.head
    plan = SourceHeadPlan()
    if head is None or not table.head:
        return plan
    if head.kind == "user" or (
        head.kind == "classifier" and source.nesting and head.pooling is None
    ):
        raise UnsupportedLayerError(_user_head_message(source, variant))
    pooling = resolve_pooling(source, pooling, plan.notes)
    if source.nesting and source.nesting.training is False:
        plan.notes.append(
            f"the base {source.nesting.layer!r} is called with training=False: its BatchNorm was"
            " frozen while fine-tuning in Keras; keep it so in PyTorch with"
            " converter.bn.freeze(model)"
        )
    if head.kind == "classifier" and not source.nesting:
        if head.num_classes != _stock_classes(variant, table.head["module"]):
            plan.kwargs = {"num_classes": head.num_classes}
        return plan
    lib = variant.target.partition(":")[0]
    if lib not in POOLED:
        return plan  # the user's own target: built as their factory says
    classes = head.num_classes if head.kind == "classifier" else None
    plan.kwargs, plan.surgeries = POOLED.get(lib)(table.head, pooling, classes)
    if table.head.get("top_modules"):
        plan.surgeries.insert(
            0, {"name": "identity", "args": {"modules": list(table.head["top_modules"])}}
        )
    if head.kind == "classifier":
        plan.rules.append(_user_dense_rule(source, table))
    return plan


def _stock_classes(variant: Any, module: str) -> int | None:
    from .manifest import load_manifest, manifest_path

    if not manifest_path(variant.target).is_file():
        return None
    for t in load_manifest(variant.target)["tensors"]:
        if t["key"] == f"{module}.weight":
            return int(t["shape"][0])
    return None


def _user_dense_rule(source: Any, table: Any) -> Any:
    from .tables import Rule
    from .transforms import TRANSFORMS

    (name,) = source.head.layers
    return Rule(re.compile(re.escape(name)), table.head["module"], TRANSFORMS.get("dense"))


def classifier_resize(
    plan: SourceHeadPlan, source: Any, table: Any, target_manifest: dict[str, Any]
) -> bool:
    """When the target's classifier (its top replaced by identity) takes other features than the
    user's Dense (MobileNetV3: 1024 after conv_head, 576 without), add a ``linear`` surgery; True
    when added (the target manifest must then be rebuilt)."""
    head = source.head
    if not plan.rules or head is None or head.features is None:
        return False
    module = table.head["module"]
    shape = next(
        (t["shape"] for t in target_manifest["tensors"] if t["key"] == f"{module}.weight"), None
    )
    if shape is None or shape[1] == head.features:
        return False
    out_features = shape[0]  # the target's class count (a --num-classes reset included)
    plan.surgeries.append(
        {
            "name": "linear",
            "args": {
                "module": module,
                "in_features": head.features,
                "out_features": out_features,
            },
        }
    )
    return True


def _user_head_message(source: Any, variant: Any) -> str:
    layers = ", ".join(source.head.layers)
    base = source.nesting.layer if source.nesting else source.manifest_id
    return (
        f"{source.raw.path}: the model's head after {base} is the user's own ({layers}); only "
        f"[pooling, Dropout,] one Dense maps onto {variant.target}'s classifier: pass --mapping "
        "with a table mapping these layers, or --to file.py:factory building a model with this head"
    )


def resolve_pooling(source: Any, given: str | None, notes: list[str]) -> str | None:
    """The pooling after a headless or nested base (avg/max/None): what the file says, else
    ``given`` (``--pooling`` of convert and verify), else avg (noted in ``notes``); None for the
    application's own top."""
    if given is not None and given not in POOLINGS:
        raise MappingError(f"pooling {given!r}: valid: {', '.join(POOLINGS)}")
    given_value = None if given == "none" else given
    if source.head.kind == "classifier" and not source.nesting:
        return None  # the application's own top: its pooling is the architecture's
    found = source.head.pooling
    if found != "unknown":
        if given is not None and given_value != found:
            raise MappingError(
                f"{source.raw.path}: the file's model pools with {found or 'none'}, not {given};"
                " leave --pooling out"
            )
        return found
    if given is not None:
        return given_value
    if source.head.kind == "headless" or source.nesting:
        notes.append(
            f"{source.raw.format} files do not record the pooling after the base; assumed avg "
            "(pass --pooling max or none if the Keras model used another)"
        )
    return "avg"
