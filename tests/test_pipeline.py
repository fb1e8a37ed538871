"""The pipeline's parts: the target ledger, the preprocessing registry, one source resolution for
convert/inspect/verification, and conversion output pinned byte for byte."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import converter
from helpers import (
    ALL_FORMATS,
    GENERATOR,
    ROOT,
    keras_build_args,
    make_keras_fixture,
    make_tiny_keras,
    tiny_table,
)
from converter import formats, preprocessing
from converter.errors import (
    ConverterError,
    InvalidTensorError,
    MappingError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from converter.ledger import TargetLedger
from converter.pipeline import ConversionResult, dry_run
from converter.preprocessing import PREPROCESSING, Affine, preprocessing_spec
from converter.registry import Registry
from converter.refusals import builtin_refusals
from converter.source import SourceLayer, resolve_source
from converter.tables import builtin_tables, load_table

R50_FORMATS = ALL_FORMATS  # the fixture test_errors.py builds too


def _fixture(manifest_id: str, formats_built: list[str]) -> dict:
    fn, kwargs, inp = keras_build_args(manifest_id)
    return make_keras_fixture(fn, kwargs, inp, formats_built)


def _table(tmp_path: Path, name: str, *replacements: tuple[str, str]) -> Path:
    text = (ROOT / "mappings" / name).read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / name
    path.write_text(text)
    return path


def _efficientnet_b0(table):
    return next(v for v in table.variants if v.source == "keras:EfficientNetB0")


# ------------------------------------------------------------------ the ledger


def test_ledger_places_in_target_dtype_and_keeps_target_order():
    ledger = TargetLedger(
        {
            "tensors": [
                {"key": "b", "shape": [2], "dtype": "float32"},
                {"key": "a", "shape": [], "dtype": "int64"},
            ]
        }
    )
    assert ledger.place("a", np.array(3), "l1", "identity")
    assert ledger.place("b", np.ones(2, np.float64), "l2", "identity")
    out = ledger.finish("src -> tgt", "t")
    assert list(out) == ["b", "a"] and out["b"].dtype == np.float32 and out["a"].dtype == np.int64
    assert ledger.filled_by == {"a": "l1", "b": "l2"}


def test_ledger_reports_shape_mismatch_first():
    ledger = TargetLedger({"tensors": [{"key": "w", "shape": [2, 3], "dtype": "float32"}]})
    assert not ledger.place("w", np.ones((3, 2)), "dense", "dense (in,out)->(out,in)")
    assert not ledger.place("nope", np.ones(1), "dense", "identity")
    with pytest.raises(
        ShapeMismatchError,
        match=r"src -> tgt: shape mismatch: w: dense gives "
        r"\(3, 2\) after dense \(in,out\)->\(out,in\), "
        r"target expects \(2, 3\)",
    ):
        ledger.finish("src -> tgt", "t")


def test_one_error_lists_every_problem(tmp_path):
    """A table with three mistakes: all three in one MappingError (the message text is what the
    pipeline printed before the ledger existed)."""
    path = _table(
        tmp_path,
        "efficientnet.toml",
        ("source = 'stem_conv'\n", "source = 'stem_convolution'\n"),
        ("target = 'bn1'\n", "target = 'bn9'\n"),
    )
    table = load_table(path)
    with pytest.raises(MappingError) as exc:
        dry_run(table, _efficientnet_b0(table))
    assert str(exc.value) == (
        "<dry-run keras:EfficientNetB0> -> timm:tf_efficientnet_b0 (table keras-efficientnet): "
        "1 source tensors mapped by no rule: stem_conv/kernel; "
        "6 target tensors left unfilled: conv_stem.weight, bn1.weight, bn1.bias, bn1.running_mean, "
        "bn1.running_var, bn1.num_batches_tracked; "
        "rules produce keys the target does not have: bn9.weight (from stem_bn), "
        "bn9.bias (from stem_bn), bn9.running_mean (from stem_bn), bn9.running_var (from stem_bn)"
    )


# ------------------------------------------------------------------ preprocessing registry


def _layer(name: str, class_name: str, **config) -> SourceLayer:
    return SourceLayer(name, class_name, config, "file")


def test_preprocessing_composes_in_model_order():
    layers = [
        _layer("rescaling", "Rescaling", scale=1 / 255.0, offset=0.0),
        _layer("normalization", "Normalization", mean=[0.4, 0.5, 0.6], variance=[0.04, 0.09, 0.16]),
    ]
    spec = preprocessing_spec(layers)
    assert [s["op"] for s in spec["steps"]] == ["rescale", "normalize"]
    x = np.random.default_rng(0).uniform(0, 255, (5, 3))
    expected = (x / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.3, 0.4])
    np.testing.assert_allclose(x * spec["scale"] + spec["offset"], expected, rtol=1e-12)


def test_unknown_preprocessing_class_is_a_clear_mapping_error():
    with pytest.raises(MappingError) as exc:
        preprocessing_spec(
            [_layer("rescaling", "Rescaling", scale=2.0), _layer("crop", "CenterCrop")]
        )
    assert str(exc.value) == (
        "layer 'crop' (CenterCrop) is dropped as preprocessing, but ckptport records only "
        "Normalization, Rescaling; map it or drop it with as='ignore'"
    )


def test_table_dropping_an_unknown_class_as_preprocessing_fails_the_conversion(tmp_path):
    path = _table(
        tmp_path,
        "efficientnet.toml",
        ("source = 'rescaling(_\\d+)?'", "source = '(rescaling|stem_conv_pad)(_\\d+)?'"),
    )
    table = load_table(path)
    with pytest.raises(
        MappingError,
        match=r"layer 'stem_conv_pad' \(ZeroPadding2D\) is dropped as "
        r"preprocessing, but ckptport records only",
    ):
        dry_run(table, _efficientnet_b0(table))


def test_a_new_preprocessing_layer_is_one_registry_entry(monkeypatch):
    registry: Registry = Registry("preprocessing layer")
    for name, step in PREPROCESSING.items():
        registry.add(name, step)

    @registry.register("Negate")
    def negate(layer, before):
        return Affine(-before.scale, -before.offset), {"layer": layer.name, "op": "negate"}

    monkeypatch.setattr(preprocessing, "PREPROCESSING", registry)
    spec = preprocessing_spec(
        [_layer("rescaling", "Rescaling", scale=2.0, offset=1.0), _layer("negate", "Negate")]
    )
    assert spec["scale"] == [-2.0] and spec["offset"] == [-1.0]
    with pytest.raises(MappingError, match="records only Negate, Normalization, Rescaling"):
        preprocessing_spec([_layer("crop", "CenterCrop")])


@pytest.mark.parametrize(
    "config,error,needle",
    [
        ({"mean": [0.5], "variance": [-1.0]}, InvalidTensorError, "negative variance"),
        ({"mean": [np.nan], "variance": [1.0]}, InvalidTensorError, "NaN/inf"),
        ({"mean": [0.5], "variance": [1.0], "invert": True}, UnsupportedLayerError, "invert=True"),
    ],
)
def test_bad_normalization_is_refused(config, error, needle):
    with pytest.raises(error, match=needle):
        preprocessing_spec([_layer("norm", "Normalization", **config)])


# ------------------------------------------------------------------ one source resolution


def test_convert_inspect_and_keras_runner_resolve_through_resolve_source(tmp_path, monkeypatch):
    """All three go through converter.source (source_manifests -> resolve) and agree on the file."""
    import converter.source as source_module
    from converter import keras_runner

    src = _fixture("keras:ResNet50", R50_FORMATS)["files"]["tf-checkpoint"]
    calls: list[tuple[list[str], str | None]] = []
    real_resolve = source_module.resolve

    def spy(raw, manifests, model_manifest=None, heads=None):
        resolved = real_resolve(raw, manifests, model_manifest, heads)
        calls.append(([m["id"] for m in manifests], resolved.manifest_id))
        return resolved

    monkeypatch.setattr(source_module, "resolve", spy)
    direct = resolve_source(src)
    info = converter.inspect(src)
    result = converter.convert(src)
    args = argparse.Namespace(
        src=src,
        format=None,
        mapping=None,
        source_model=None,
        device="cpu",
        inputs=str(tmp_path / "missing.npy"),
        taps="",
        out="",
        train_step=False,
    )
    with pytest.raises(FileNotFoundError, match="missing.npy"):  # stops right after resolving
        keras_runner.run(args)
    assert direct.manifest_id == info["architecture"] == result.source_arch == "keras:ResNet50"
    assert len(calls) == 4 and all(call == calls[0] for call in calls)
    tabled = list(dict.fromkeys(v.source for t in builtin_tables() for v in t.variants if v.source))
    refused = [mid for mid in builtin_refusals() if mid not in tabled]  # recognised, tried last
    assert refused and calls[0][0] == tabled + refused


def test_resolve_source_refuses_pytorch_side_files(tmp_path):
    path = tmp_path / "m.safetensors"
    formats.write(path, {"w": np.ones(2, np.float32)}, {}, format="safetensors")
    with pytest.raises(ConverterError, match="already a PyTorch-side file"):
        resolve_source(path)


# ------------------------------------------------------------------ output bytes

# These digests were recorded by running the code of branch head b998ece (before the ledger,
# preprocessing and resolve_source restructuring) on the same inputs: the restructured pipeline
# must give the same bytes. "ckptport.version" is pinned so that a version bump alone does not
# break them; anything else that changes them changes what a conversion writes: re-record only
# for a deliberate output change, and say so in the commit.
DRY_RUN_DIGESTS = {  # target -> first 16 hex digits of sha256(safetensors bytes + layer records)
    "timm:tf_efficientnet_b0": "023b959f216f6349",
    "timm:tf_efficientnet_b1": "a96431f181e682d5",
    "timm:tf_efficientnet_b2": "a3a560414f8244c9",
    "timm:tf_efficientnet_b3": "bb8b2b96c5bd1cbb",
    "timm:tf_efficientnet_b4": "02390272b6d5acc9",
    "timm:tf_efficientnet_b5": "3d29d84ca3c48cc4",
    "timm:tf_efficientnet_b6": "9bfb9a5623b13667",
    "timm:tf_efficientnet_b7": "6d08296bdf443f8c",
    "timm:tf_mobilenetv3_small_100": "05bf9fc448970a7e",
    "timm:tf_mobilenetv3_small_075": "5c2319d7bb039ee0",
    "timm:tf_mobilenetv3_small_minimal_100": "04852bc9ff767b33",
    "timm:tf_mobilenetv3_large_100": "deccc9daddf65e99",
    "timm:tf_mobilenetv3_large_075": "ba2bf61d40fb8b65",
    "timm:tf_mobilenetv3_large_minimal_100": "b1e670c83f088efe",
    "torchvision:resnet50": "5d0608358d8c6f94",
    "torchvision:resnet101": "17205a7c0b9e0518",
    "torchvision:resnet152": "0d442cb594438436",
    "timm:resnet50": "6affe127534a1607",
    "timm:resnet101": "f8b92aac3ba7abe7",
    "timm:resnet152": "6e05b1251c230b4f",
}
# Real fixtures: sha256 of the safetensors with "source.sha256" pinned too (a re-saved fixture with
# the same weights has other bytes); valid for the fixture generator version they were built by
# (the first 12 hex digits of the sha256 of fixtures/keras_models.py, as conftest keys its cache).
FIXTURE_GENERATOR = (
    "92045717196a"  # ConvNeXt randomization added; these fixtures re-checked: same bytes
)
FIXTURE_DIGESTS = {
    (
        "keras:EfficientNetB0",
        "keras",
    ): "256c487f8091a584332f03984ab7e3075a78ee3f5fb90f3b2719df3ea5fa83c8",
    (
        "keras:ResNet50",
        "tf-checkpoint",
    ): "0603e9b9c3f098631b04730ab6b7d73182c9f77400425c6aa6f7c3c84a908a4e",
}


# The metadata keys b998ece wrote; keys added since (source.head, source.nesting, notes) are new
# information, not a change of what was there, and are left out of the pinned bytes.
RECORDED_KEYS = {
    "ckptport.version",
    "ckptport.format",
    "source.file",
    "source.sha256",
    "source.format",
    "source.arch",
    "source.config_origin",
    "table.id",
    "table.version",
    "target",
    "target.kwargs",
    "surgeries",
    "bn_config",
    "preprocessing",
    "dropped",
}


@pytest.fixture
def exact_header(monkeypatch):
    """The digests were recorded before safetensors headers got room for a streamed write's
    metadata (formats/safetensors_file.Layout): with no room, the header is exact as then, so the
    digests still pin every other byte."""
    from converter.formats import safetensors_file

    monkeypatch.setattr(safetensors_file, "METADATA_ROOM", 0)
    monkeypatch.setattr(safetensors_file, "METADATA_ROOM_PER_TENSOR", 0)


def _saved_bytes(result: ConversionResult, path: Path, **pinned: str) -> bytes:
    recorded = {k: v for k, v in result.metadata.items() if k in RECORDED_KEYS}
    metadata = {**recorded, "ckptport.version": "pinned", **pinned}
    formats.write(path, result.state_dict, metadata, format="safetensors")
    return path.read_bytes()


def test_dry_run_output_bytes_unchanged(tmp_path, exact_header):
    # the variants that existed at b998ece (tables added since have no recorded digest)
    variants = [(t, v) for t in builtin_tables() for v in t.variants if v.target in DRY_RUN_DIGESTS]
    assert sorted(v.target for _, v in variants) == sorted(DRY_RUN_DIGESTS)
    for i, (table, variant) in enumerate(variants):
        result = dry_run(table, variant)
        digest = hashlib.sha256(_saved_bytes(result, tmp_path / f"{i}.safetensors"))
        layers = [
            [
                m.source_layer,
                m.source_class,
                m.target_module,
                m.transform,
                m.tensors,
                m.tap,
                m.tap_module,
            ]
            for m in result.layers
        ]
        digest.update(json.dumps([list(result.state_dict), layers]).encode())
        assert digest.hexdigest()[:16] == DRY_RUN_DIGESTS[variant.target], variant.target


@pytest.mark.parametrize("manifest_id,fmt", list(FIXTURE_DIGESTS))
def test_fixture_conversion_bytes_unchanged(manifest_id, fmt, tmp_path, exact_header):
    if hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12] != FIXTURE_GENERATOR:
        pytest.skip(
            "fixtures/keras_models.py changed since the digests were recorded "
            "(other random weights); the dry-run digests still hold"
        )
    built = R50_FORMATS if manifest_id == "keras:ResNet50" else ["keras"]
    result = converter.convert(_fixture(manifest_id, built)["files"][fmt])
    data = _saved_bytes(result, tmp_path / "m.safetensors", **{"source.sha256": "pinned"})
    assert hashlib.sha256(data).hexdigest() == FIXTURE_DIGESTS[(manifest_id, fmt)]


SOURCE_MODEL_SCRIPT = """
import hashlib, json, sys
import torchvision  # noqa: F401  (torch side before Keras)
import keras
import converter

keras_file, weights_file, table, factory = sys.argv[1:5]
keras.models.load_model(keras_file).save_weights(weights_file)
out = {}
routes = (("file", keras_file, None), ("model", weights_file, factory))
for name, src, source_model in routes:
    result = converter.convert(src, mapping=table, source_model=source_model)
    digest = hashlib.sha256()
    for key, array in result.state_dict.items():
        digest.update(key.encode() + array.tobytes())
    out[name] = [result.config_origin, result.source_input_shape, digest.hexdigest()]
print(json.dumps(out))
"""


def test_source_model_resolves_weights_like_the_file_config(tmp_path):
    """--source-model (the user's builder) and the .keras file's own config resolve the same
    weights to the same tensors (Keras runs in a subprocess)."""
    import subprocess
    import sys

    keras_file, weights_file = tmp_path / "tiny.keras", tmp_path / "tiny.weights.h5"
    make_tiny_keras(keras_file)
    table = tmp_path / "tiny.toml"
    table.write_text(tiny_table())
    factory = f"{ROOT / 'fixtures' / 'keras_tiny.py'}:build"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            SOURCE_MODEL_SCRIPT,
            str(keras_file),
            str(weights_file),
            str(table),
            factory,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file"][:2] == ["file", [8, 8, 3]] and out["model"][:2] == ["model", [8, 8, 3]]
    assert out["file"][2] == out["model"][2]
