"""Source resolution beyond a fresh session's build: auto names offset by layers built earlier in
the same session (renumbered to the architecture's), and config-less files that fit several
shipped architectures with the same weights (told apart from the file, or refused)."""

from __future__ import annotations

import numpy as np
import pytest

import converter
from converter.source import LayerSkeleton, NoFit, canonical_auto_names, match_layer_names
from helpers import (
    ROOT,
    assert_clean_error,
    keras_build_args,
    make_keras_fixture,
    rel_err,
    run_cli,
    torch_logits,
)
from converter.model import load_model

OFFSET_GENERATOR = ROOT / "fixtures" / "keras_offset.py"
# with a config (renumbered), group keys + name attributes, legacy and TF1 names (rank-matched)
OFFSET_FORMATS = ["keras", "h5", "weights.h5", "h5-weights", "tf-names"]
CONFIGLESS = ["weights.h5", "h5-weights", "tf-checkpoint", "savedmodel"]


def _skel(*names: str) -> list[LayerSkeleton]:
    return [LayerSkeleton(n, "Conv2D", {}, [("kernel", (1, 1, 2, 2))]) for n in names]


def test_auto_names_renumbered_by_number_not_by_model_order():
    # graph order (conv2d_2 before conv2d_1) differs from creation order (the numbers)
    skel = _skel("conv2d", "conv2d_2", "conv2d_1")
    renamed: dict[str, str] = {}
    index = match_layer_names(["conv2d_5", "conv2d_6", "conv2d_7"], skel, renamed)
    assert index == {"conv2d_5": 0, "conv2d_6": 2, "conv2d_7": 1}
    assert renamed == {"conv2d_5": "conv2d", "conv2d_6": "conv2d_1", "conv2d_7": "conv2d_2"}
    assert match_layer_names(["conv2d_1", "conv2d"], skel) == {"conv2d": 0, "conv2d_1": 2}
    layers = [LayerSkeleton(n, c, {}) for n, c in [("conv2d_9", "Conv2D"), ("re_lu_4", "ReLU")]]
    assert canonical_auto_names(layers + _skel("conv2d_3", "stem")) == {
        "conv2d_3": "conv2d",
        "conv2d_9": "conv2d_1",
        "re_lu_4": "re_lu",
    }


def test_auto_names_never_matched_by_position():
    # one layer fewer in the file than in the model, names not the model's: no guess by position
    with pytest.raises(NoFit, match="2 conv2d layers in the file, 3 in the model"):
        match_layer_names(["conv2d_5", "conv2d_6"], _skel("conv2d", "conv2d_1", "conv2d_2"))


@pytest.fixture(scope="module")
def inception():
    fn, kwargs, inp = keras_build_args("keras:InceptionV3")
    offset = make_keras_fixture(fn, kwargs, inp, OFFSET_FORMATS, generator=OFFSET_GENERATOR)
    canonical = make_keras_fixture(fn, kwargs, inp, ["keras"])
    assert np.array_equal(offset["logits"], canonical["logits"])  # the same model, names aside
    return offset, converter.convert(canonical["files"]["keras"])


@pytest.mark.parametrize("fmt", OFFSET_FORMATS)
def test_offset_auto_names_convert_like_a_fresh_session(inception, fmt, tmp_path):
    offset, canonical = inception
    result = converter.convert(offset["files"][fmt])
    assert result.source_arch == "keras:InceptionV3"
    assert result.state_dict.keys() == canonical.state_dict.keys()
    for key, value in canonical.state_dict.items():
        assert result.state_dict[key].tobytes() == value.tobytes(), key
    assert result.config_origin == ("file" if fmt in ("keras", "h5") else "manifest")

    def settings(bn: dict) -> dict:
        return {k: {**v, "config_origin": None} for k, v in bn.items()}

    assert settings(result.bn_config) == settings(canonical.bn_config)
    assert result.preprocessing == canonical.preprocessing
    (note,) = [n for n in result.notes if "auto names renumbered" in n]
    assert "conv2d_2 -> conv2d (+93)" in note and "batch_normalization_1 ->" in note
    assert "auto names renumbered" in result.metadata["notes"]
    model = load_model(result.save(tmp_path / "m.safetensors"))
    assert (
        rel_err(torch_logits(model, offset["x"], result.preprocessing), offset["logits"]) < 2e-3
    )  # DEEP_TOL


@pytest.fixture(scope="module")
def effv2_no_preprocessing():
    fn, kwargs, _ = keras_build_args("keras:EfficientNetV2B0(include_preprocessing=False)")
    assert kwargs == {"include_preprocessing": False}
    return make_keras_fixture(fn, kwargs, {"size": 32, "range": [0.0, 255.0]}, CONFIGLESS)


@pytest.mark.parametrize("fmt", ["h5-weights", "savedmodel"])
def test_ambiguous_configless_file_refused(effv2_no_preprocessing, fmt, capsys, tmp_path):
    out = tmp_path / "m.safetensors"
    rc, _, err = run_cli(["convert", effv2_no_preprocessing["files"][fmt], "-o", out], capsys)
    assert_clean_error(
        rc,
        err,
        "keras:EfficientNetV2B0, keras:EfficientNetV2B0(include_preprocessing=False)",
        "computed differently",
        "only keras:EfficientNetV2B0 has rescaling, normalization",
        ".keras file",
        "--source-model",
        out=out,
    )


@pytest.mark.parametrize("fmt", ["weights.h5", "tf-checkpoint"])
def test_twin_told_apart_by_the_file(effv2_no_preprocessing, fmt):
    # .weights.h5 lists every layer; a TF object checkpoint numbers them (_operations/N)
    result = converter.convert(effv2_no_preprocessing["files"][fmt])
    assert result.source_arch == "keras:EfficientNetV2B0(include_preprocessing=False)"
    assert result.preprocessing["steps"] == []  # the default manifest would record two


def test_offset_keras_verifies_layer_by_layer(inception, capsys, tmp_path):
    # the Keras runner rebuilds the file's own model (offset names) and taps it by the canonical
    # names the conversion used: auto names rank-matched, not by name (which would be off by one)
    offset, _ = inception
    out = converter.convert(offset["files"]["keras"]).save(tmp_path / "m.safetensors")
    rc, stdout, err = run_cli(["verify", offset["files"]["keras"], out, "--rtol", "2e-3"], capsys)
    assert rc == 0, err + stdout
    assert "PASS: 189 layer pairs" in stdout + err
