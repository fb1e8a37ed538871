"""Shipped layer manifests (mappings/manifests): the PyTorch side checked against the real timm /
torchvision models, plus static checks of every manifest (ids, canonical JSON, canonical Keras
auto-names, BN facts, MobileNetV3 block correspondence) that need no TensorFlow. The Keras side is
checked against real Keras builds in test_manifests_keras.py."""

from __future__ import annotations

import torchvision  # noqa: F401  (torch side before anything can import Keras; see CONTRIBUTING.md)
import timm  # noqa: F401

import importlib.util
import json
import re
from pathlib import Path

import pytest

from converter.manifest import (
    INDEX_FILE,
    SCHEMA,
    LazyManifest,
    build_manifest_index,
    index_text,
    manifest_dir,
    slug,
    source_manifest,
    weighted_layers,
)

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for p in manifest_dir().glob("*.json") if p.name != INDEX_FILE)
MANIFESTS = {p: json.loads(p.read_text()) for p in FILES}
SOURCES = {m["id"]: m for m in MANIFESTS.values() if m.get("framework") == "keras"}
TARGETS = {m["id"]: m for m in MANIFESTS.values() if "library" in m}


def _gen():
    spec = importlib.util.spec_from_file_location(
        "_gen_manifests", ROOT / "fixtures" / "gen_manifests.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def to_snake_case(name: str) -> str:
    """Keras' auto-name base for a layer class (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    name = re.sub("([a-z])([A-Z])", r"\1_\2", name)
    return name.lower()


# --- every file -------------------------------------------------------------------------------


def test_shipped_set_is_what_the_generator_makes():
    gen = _gen()
    assert sorted(m["id"] for m in MANIFESTS.values()) == sorted(gen.ALL_IDS)
    assert set(SOURCES) == set(gen.SOURCES) and set(TARGETS) == set(gen.TARGETS)


def test_index_is_current():
    """The shipped index (what detection reads instead of every manifest) is the manifests' own
    weighted layers and shapes, and the lazy manifests it gives read the rest from the file."""
    assert (manifest_dir() / INDEX_FILE).read_text() == index_text(build_manifest_index())
    lazy = source_manifest("keras:ResNet50")
    assert isinstance(lazy, LazyManifest) and lazy["layers"] == SOURCES["keras:ResNet50"]["layers"]
    assert weighted_layers(lazy) == weighted_layers(SOURCES["keras:ResNet50"])


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_file_is_canonical(path):
    """Named by its id's slug, schema current, written exactly as the generator writes it."""
    m = MANIFESTS[path]
    assert m["schema"] == SCHEMA
    assert path.name == f"{slug(m['id'])}.json"
    assert path.read_text() == json.dumps(m, indent=1, sort_keys=True) + "\n"


# --- PyTorch side against the real models -----------------------------------------------------


SLOW_TARGETS = {"torchvision:vgg19"}  # 144M parameters: initialising them takes seconds
TARGET_PARAMS = [
    pytest.param(m, marks=[pytest.mark.slow] if m in SLOW_TARGETS else [], id=m)
    for m in sorted(TARGETS)
]


@pytest.mark.parametrize("mid", TARGET_PARAMS)
def test_target_manifest_matches_real_model(mid):
    import torch

    from converter.model import build_target

    man = TARGETS[mid]
    lib, _, name = mid.partition(":")
    assert (man["library"], man["name"]) == (lib, name)
    model = build_target(mid, **man["kwargs"])
    sd = model.state_dict()
    assert [t["key"] for t in man["tensors"]] == list(sd), "state-dict keys (in order)"
    for t in man["tensors"]:
        v = sd[t["key"]]
        assert t["shape"] == list(v.shape), t["key"]
        assert t["dtype"] == str(v.dtype).removeprefix("torch."), t["key"]
    bn = {
        n: {
            "eps": m.eps,
            "momentum": m.momentum,
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert man["bn_modules"] == bn


# --- Keras side, static -----------------------------------------------------------------------


# Layers keras.applications names explicitly with an auto-name look-alike (not numbered per process)
EXPLICIT_NAMES = {"MobileNet": {"reshape_2"}}  # by builder: keras/src/applications/mobilenet.py


@pytest.mark.parametrize("mid", sorted(SOURCES))
def test_source_auto_names_are_canonical(mid):
    """Auto-named layers (`input_layer`, `rescaling`, `re_lu_3`...) are numbered as in a fresh
    process: for each base, exactly base, base_1, ..., base_{n-1}."""
    man = SOURCES[mid]
    seen: dict[str, list[int]] = {}
    for lay in man["layers"]:
        base = to_snake_case(lay["class_name"])
        m = re.fullmatch(re.escape(base) + r"(?:_(\d+))?", lay["name"])
        if m and lay["name"] not in EXPLICIT_NAMES.get(man["build"]["fn"], ()):
            seen.setdefault(base, []).append(int(m.group(1) or 0))
    assert man["layers"][0]["name"] == "input_layer"
    for base, idx in seen.items():
        assert sorted(idx) == list(range(len(idx))), f"{base}: {sorted(idx)}"
    build = man["build"]
    weighted = [lay for lay in man["layers"] if lay["vars"]]
    if build["kwargs"]["include_top"] is False:  # ConvNeXt: ends with an auto-named LayerNorm
        assert (
            weighted[-1]["name"] == "layer_normalization" and build["kwargs"].get("pooling") is None
        )
        return
    assert build["kwargs"]["weights"] is None and build["kwargs"]["include_top"] is True
    assert build["kwargs"]["classes"] == 1000 and build["kwargs"]["classifier_activation"] is None
    assert [lay for lay in man["layers"] if lay["vars"]][-1]["vars"][-1]["shape"] == [
        1000
    ]  # the head


# Keras family -> (momentum, epsilon, center, scale), or None (no BN); Keras momentum is PyTorch 1 - momentum
BN_FACTS = {
    "EfficientNetV2": (
        0.9,
        1e-3,
        True,
        True,
    ),  # before EfficientNet: the first prefix that matches wins
    "EfficientNet": (0.99, 1e-3, True, True),
    "MobileNetV2": (0.999, 1e-3, True, True),
    "MobileNetV3": (0.999, 1e-3, True, True),
    "MobileNet": (0.99, 1e-3, True, True),  # v1: after V2/V3 (prefix)
    "ResNet": (0.99, 1.001e-5, True, True),
    "Xception": (0.99, 1e-3, True, True),
    "InceptionV3": (0.99, 1e-3, True, False),
    "InceptionResNetV2": (0.99, 1e-3, True, False),
    "DenseNet": (0.99, 1.001e-5, True, True),
    "VGG": None,  # no BatchNormalization at all
    "NASNet": (0.9997, 1e-3, True, True),  # refused (mappings/refusals.toml), recognised
    "ConvNeXt": None,  # LayerNormalization only (eps 1e-6 on both sides)
}
BN_FREE_TARGETS = {"torchvision:vgg16", "torchvision:vgg19"}
BN_FREE_TARGETS |= {f"torchvision:convnext_{v}" for v in ("tiny", "small", "base", "large")}
BN_FREE_TARGETS |= {f"timm:convnext_{v}" for v in ("tiny", "small", "base", "large", "xlarge")}


@pytest.mark.parametrize("mid", sorted(SOURCES))
def test_keras_bn_facts(mid):
    family = next(f for f in BN_FACTS if mid.startswith(f"keras:{f}"))
    bns = [
        lay["config"] for lay in SOURCES[mid]["layers"] if lay["class_name"] == "BatchNormalization"
    ]
    if BN_FACTS[family] is None:
        assert not bns
        return
    assert bns
    assert {(c["momentum"], c["epsilon"], c["center"], c["scale"]) for c in bns} == {
        BN_FACTS[family]
    }


TF_EPS_TARGETS = {"torchvision:inception_v3", "timm:inception_resnet_v2"}  # eps 1e-3 by default


@pytest.mark.parametrize("mid", sorted(TARGETS))
def test_target_bn_defaults(mid):
    """timm tf_* ports and torchvision's inception_v3 (BasicConv2d) use TF's eps 1e-3; all targets
    ship PyTorch's default momentum 0.1 (the converter sets 1 - Keras momentum per module)."""
    eps = 1e-3 if ":tf_" in mid or mid in TF_EPS_TARGETS else 1e-5
    eps = TARGETS[mid]["kwargs"].get("bn_eps", eps)  # built with the table's bn_eps (mobilenetv2)
    expected = set() if mid in BN_FREE_TARGETS else {(eps, 0.1, True, True)}
    assert {
        (b["eps"], b["momentum"], b["affine"], b["track_running_stats"])
        for b in TARGETS[mid]["bn_modules"].values()
    } == expected


MNV3 = {
    "keras:MobileNetV3Small": "timm:tf_mobilenetv3_small_100",
    "keras:MobileNetV3Small(alpha=0.75)": "timm:tf_mobilenetv3_small_075",
    "keras:MobileNetV3Small(minimalistic=True)": "timm:tf_mobilenetv3_small_minimal_100",
    "keras:MobileNetV3Large": "timm:tf_mobilenetv3_large_100",
    "keras:MobileNetV3Large(alpha=0.75)": "timm:tf_mobilenetv3_large_075",
    "keras:MobileNetV3Large(minimalistic=True)": "timm:tf_mobilenetv3_large_minimal_100",
}


def mnv3_block_map(source: dict, target: dict) -> tuple[list[str], int]:
    """Keras global block k (``expanded_conv[_k]_*``) -> timm ``"stage.index"`` by block order, and
    the stage holding Keras ``conv_1`` (timm's final ConvBnAct stage, skipped from the blocks)."""
    ks: list[int] = []
    for lay in source["layers"]:
        m = re.match(r"expanded_conv(?:_(\d+))?_", lay["name"])
        if m and int(m.group(1) or 0) not in ks:
            ks.append(int(m.group(1) or 0))
    assert ks == list(range(len(ks)))
    blocks: list[str] = []
    for t in target["tensors"]:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", t["key"])
        if m and f"{m[1]}.{m[2]}" not in blocks:
            blocks.append(f"{m[1]}.{m[2]}")
    *ir, last = blocks
    assert last.endswith(".0") and f"blocks.{last}.conv.weight" in {
        t["key"] for t in target["tensors"]
    }
    assert len(ir) == len(ks)
    return ir, int(last.split(".")[0])


@pytest.mark.parametrize("mid", sorted(MNV3))
def test_mobilenetv3_block_correspondence(mid):
    """The k -> stage.index order mapping is right by shapes (depthwise and projection convs), Keras
    `conv_1` is timm `blocks.{last}.0.conv`, and the mapping table carries the same lookup."""
    from converter.tables import builtin_tables

    src, tgt = SOURCES[mid], TARGETS[MNV3[mid]]
    blocks, last = mnv3_block_map(src, tgt)
    kshape = {lay["name"]: lay["vars"][0]["shape"] for lay in src["layers"] if lay["vars"]}
    tshape = {t["key"]: t["shape"] for t in tgt["tensors"]}
    for k, si in enumerate(blocks):
        pre = "expanded_conv_" if k == 0 else f"expanded_conv_{k}_"
        h, w, c, mult = kshape[pre + "depthwise"]
        assert tshape[f"blocks.{si}.conv_dw.weight"] == [c * mult, 1, h, w], (k, si)
        _, _, cin, cout = kshape[pre + "project"]
        pw = f"blocks.{si}.conv_pwl.weight" if k else f"blocks.{si}.conv_pw.weight"
        assert tshape[pw] == [cout, cin, 1, 1], (k, si)
    _, _, cin, cout = kshape["conv_1"]
    assert tshape[f"blocks.{last}.0.conv.weight"] == [cout, cin, 1, 1]
    assert tshape[f"blocks.{last}.0.bn1.weight"] == [cout]
    variants = [
        v for t in builtin_tables() for v in t.variants if v.source == mid and v.target == MNV3[mid]
    ]
    for v in variants:
        assert v.lookups.get("blocks") == blocks
        assert v.consts.get("last") == last


# --- the generator ------------------------------------------------------------------------------


def test_generator_check_mode(tmp_path, monkeypatch, capsys):
    """--check reports a missing or differing file (exit 1) and writes nothing; a normal run writes
    it atomically (no temp files left); unknown ids exit 2 naming the valid ones."""
    import converter.manifest

    gen = _gen()
    mid = "timm:tf_mobilenetv3_small_minimal_100"
    monkeypatch.setattr(converter.manifest, "manifest_path", lambda i: tmp_path / f"{slug(i)}.json")
    out = tmp_path / f"{slug(mid)}.json"
    assert gen.main(["--check", "--only", mid]) == 1 and not out.exists()
    assert mid in capsys.readouterr().err
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--only", mid]) == 0
    assert out.read_text() == manifest_dir().joinpath(out.name).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    assert gen.main(["--check", "--only", mid]) == 0
    out.write_text(out.read_text().replace('"eps": 0.001', '"eps": 1e-05', 1))
    assert gen.main(["--check", "--only", mid]) == 1
    assert gen.main(["--only", "keras:Nope"]) == 2
    assert "valid: keras:EfficientNetB0" in capsys.readouterr().err
