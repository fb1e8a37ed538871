"""Shipped Keras source manifests checked against the real model: each test rebuilds one
keras.applications model from the manifest's ``build`` spec (in this worker, after
``clear_session``) and compares it to the shipped manifest layer by layer."""

from __future__ import annotations

import torchvision  # noqa: F401  (must precede any keras import: the other order segfaults Keras builds)
import timm  # noqa: F401

import json
import os
import re

import pytest

from converter.manifest import manifest_dir

FILES = sorted(manifest_dir().glob("keras.*.json"))
SOURCES = {m["id"]: m for m in (json.loads(p.read_text()) for p in FILES) if m.get("framework") == "keras"}
SLOW = {f"keras:EfficientNetB{i}" for i in range(4, 8)} | {"keras:ResNet152", "keras:DenseNet201", "keras:VGG19"}
SLOW |= {f"keras:EfficientNetV2{v}" for v in "SML"}
SLOW |= {"keras:ResNet152V2", "keras:NASNetLarge"}  # refused sources (mappings/refusals.toml)
SLOW |= {f"keras:EfficientNetV2{v}(include_preprocessing=False)" for v in "SML"}
SLOW |= {f"keras:ConvNeXt{v}" for v in ("Small", "Base", "Large", "XLarge")}  # 50M-350M parameters
BN_KEYS = ("momentum", "epsilon", "center", "scale")
PARAMS = [pytest.param(mid, marks=[pytest.mark.slow] if mid in SLOW else [], id=mid) for mid in sorted(SOURCES)]


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    return keras


def _auto_base(name: str, class_name: str) -> str:
    """``re_lu_3`` (a ReLU) -> ``re_lu``: auto-names compared without their per-process suffix."""
    from keras.src.utils.naming import to_snake_case

    base = to_snake_case(class_name)
    return base if re.fullmatch(re.escape(base) + r"(_\d+)?", name) else name


def _strip_auto(path: str) -> str:
    return re.sub(r"^(seed_generator)_\d+/", r"\1/", path)


@pytest.mark.parametrize("mid", PARAMS)
def test_source_manifest_matches_real_model(keras, mid):
    from converter.manifest import source_manifest_from_model

    shipped = SOURCES[mid]
    build = shipped["build"]
    assert set(build) == {"fn", "kwargs"}
    keras.backend.clear_session()
    model = getattr(keras.applications, build["fn"])(**build["kwargs"])
    live = json.loads(json.dumps(source_manifest_from_model(model, mid, build)))  # as shipped: lists
    del model
    keras.backend.clear_session()

    assert len(shipped["layers"]) == len(live["layers"])
    for want, got in zip(shipped["layers"], live["layers"]):
        where = f"{mid} layer {want['name']!r}"
        assert want["class_name"] == got["class_name"], where
        assert _auto_base(want["name"], want["class_name"]) == _auto_base(got["name"], got["class_name"]), where
        assert [(v["name"], v["shape"], v["dtype"]) for v in want["vars"]] == \
            [(v["name"], v["shape"], v["dtype"]) for v in got["vars"]], where
        if want["class_name"] == "BatchNormalization":
            assert {k: want["config"][k] for k in BN_KEYS} == {k: got["config"][k] for k in BN_KEYS}, where
        if want["class_name"] == "InputLayer":
            assert want["config"]["batch_shape"] == got["config"]["batch_shape"], where
        if "op_index" in want:
            assert want["op_index"] == got.get("op_index"), where
    if "flat_variables" in shipped:
        assert [[i, _strip_auto(p)] for i, p in shipped["flat_variables"]] == \
            [[i, _strip_auto(p)] for i, p in live["flat_variables"]]
