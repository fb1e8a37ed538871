"""What verification compares, checked statically for every variant of every table: each tapped
Keras layer that applies an activation inside (Conv2D/Dense with activation='relu', as in VGG) is
compared with a target module that applies it too (``tap_module``), never with the bare conv; every
tap module exists in the target model; [head] names the layer that holds the classifier."""

from __future__ import annotations

import torchvision  # noqa: F401  (torch side first; see DEVELOPERS.md)

import re

import pytest

from converter.manifest import load_manifest
from helpers import headless_build
from converter.tables import Rule, builtin_tables, render

VARIANTS = [(t, v) for t in builtin_tables() for v in t.variants]
IDS = [f"{v.source}->{v.target}" for _, v in VARIANTS]
LINEAR = (None, "linear")


def planned_taps(table, variant) -> list[tuple[dict, str, str | None]]:
    """(source layer, target module, tap module or None) for each tapped layer, as the rules say."""
    out = []
    for lay in load_manifest(variant.source)["layers"]:
        hit = table.match(lay["name"]) if lay["vars"] else None
        if hit is None or not isinstance(hit[0], Rule) or hit[0].tap is False:
            continue
        rule, m = hit
        module = render(rule.target, m, variant, lay["name"])
        tap_module = None
        if rule.tap_module:
            tap_module = render(rule.tap_module, m, variant, lay["name"], target=module)
        out.append((lay, module, tap_module))
    return out


@pytest.mark.parametrize("table,variant", VARIANTS, ids=IDS)
def test_activation_inside_a_layer_is_tapped_after_it(table, variant):
    for lay, module, tap_module in planned_taps(table, variant):
        activation = lay["config"].get("activation")
        if activation not in LINEAR and lay["name"] != table.head.get("source"):
            assert tap_module not in (None, module), (
                f"{lay['name']} applies {activation} inside; comparing it with the bare {module} "
                "would fail verification: give the rule a tap_module (or tap = false)"
            )


@pytest.mark.parametrize("table,variant", VARIANTS, ids=IDS)
def test_tap_modules_exist_in_the_target(table, variant):
    import torch

    from converter.model import build_target

    with torch.device("meta"):  # structure only: no parameter initialisation
        modules = dict(build_target(variant.target, **variant.target_kwargs).named_modules())
    for lay, module, tap_module in planned_taps(table, variant):
        assert module in modules, lay["name"]
        if tap_module:
            where = f"{lay['name']}: tap module {tap_module} of {variant.target}"
            assert tap_module in modules, where
            if lay["config"].get("activation") == "relu":
                assert isinstance(modules[tap_module], torch.nn.ReLU), where
            parent, _, name = module.rpartition(".")
            tap_parent, _, tap_name = tap_module.rpartition(".")
            if parent == tap_parent:  # a sibling (VGG's features.N+1): the very next one
                children = [n for n, _ in modules[parent].named_children()]
                assert children.index(tap_name) == children.index(name) + 1, where


# include_top=False builds have no classifier (the user's Dense: tests/test_nesting_depth.py)
HEADED = [
    pytest.param(t, v, id=i)
    for (t, v), i in zip(VARIANTS, IDS)
    if t.head and not headless_build(v.source)
]


@pytest.mark.parametrize("table,variant", HEADED)
def test_head_names_the_classifier(table, variant):
    """--num-classes drops the source layers matching [head].source and refills [head].module: the
    last weighted source layer, mapped into that module, which holds the target's last tensors."""
    layers = [lay for lay in load_manifest(variant.source)["layers"] if lay["vars"]]
    heads = [lay for lay in layers if re.fullmatch(table.head["source"], lay["name"])]
    assert heads and heads[-1] is layers[-1]
    rule, m = table.match(heads[-1]["name"])
    assert render(rule.target, m, variant, "head") == table.head["module"]
    keys = [t["key"] for t in load_manifest(variant.target)["tensors"]]
    assert keys[-1].startswith(table.head["module"] + ".")
