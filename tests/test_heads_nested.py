"""Issue 8 parts 2 and 3: re-headed (classes=N), headless (include_top=False, avg/max pooling) and
nested applications (the base as one layer of the user's Sequential/functional model) convert from
every source format and match Keras; a richer user head is refused, naming its layers."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import converter
from helpers import WRAPPED_FORMATS, make_wrapped_fixture, rel_err, torch_logits
from converter.model import load_model

TOL = 1e-4  # max abs error relative to the std of the Keras outputs, as in test_convert_e2e.py

CASES = {
    # id: (keras.applications fn, kwargs, wrap, classes, target, expected head)
    "classes10": (
        "EfficientNetB0",
        {"classes": 10},
        "none",
        5,
        "timm:tf_efficientnet_b0",
        {"kind": "classifier", "num_classes": 10},
    ),
    "headless-avg": (
        "ResNet50",
        {"include_top": False, "pooling": "avg"},
        "none",
        5,
        "torchvision:resnet50",
        {"kind": "headless"},
    ),
    "headless-max": (
        "ResNet50",
        {"include_top": False, "pooling": "max"},
        "none",
        5,
        "torchvision:resnet50",
        {"kind": "headless"},
    ),
    "sequential": (
        "MobileNetV3Small",
        {},
        "seq",
        5,
        "timm:tf_mobilenetv3_small_100",
        {"kind": "classifier", "num_classes": 5},
    ),
    "functional": (
        "ResNet50",
        {},
        "fn",
        5,
        "torchvision:resnet50",
        {"kind": "classifier", "num_classes": 5},
    ),
}
CONFIG_FORMATS = ("keras", "h5")  # the formats that store the model config


def _fixture(case: str) -> dict:
    fn, kwargs, wrap, classes, _, _ = CASES[case]
    return make_wrapped_fixture(fn, kwargs, wrap, classes)


def _keras_bn_layers(keras_file: str) -> dict[str, dict]:
    """BN layer configs straight from the .keras archive's config.json, nested models walked
    (independent of ckptport)."""
    with zipfile.ZipFile(keras_file) as zf:
        todo, out = [json.loads(zf.read("config.json"))], {}
    while todo:
        cfg = todo.pop()["config"]
        for lay in cfg.get("layers", []):
            if lay["class_name"] == "BatchNormalization":
                out[lay["config"]["name"]] = lay["config"]
            elif "layers" in lay["config"]:
                todo.append(lay)
    return out


def _bn_checked(model: torch.nn.Module, result, keras_file: str) -> None:
    """Every BN module carries its Keras layer's momentum (as 1 - m) and eps."""
    keras_bn = _keras_bn_layers(keras_file)
    bns = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    assert bns and set(bns) == set(result.bn_config) and len(bns) == len(keras_bn)
    for name, mod in bns.items():
        cfg = keras_bn[result.bn_config[name]["source_layer"]]
        assert mod.momentum == pytest.approx(1 - cfg["momentum"], abs=1e-12)
        assert mod.momentum < 0.5
        assert mod.eps == pytest.approx(cfg["epsilon"], rel=1e-12)


@pytest.mark.parametrize("fmt", WRAPPED_FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_converts_and_matches_keras(case, fmt, tmp_path):
    fx = _fixture(case)
    _, _, wrap, _, target, expected = CASES[case]
    # TF checkpoints and SavedModels do not record the pooling: the user says it (default avg, noted)
    unrecorded = fmt in ("tf-checkpoint", "savedmodel") and (
        wrap != "none" or "pooling" in CASES[case][1]
    )
    pooling = CASES[case][1].get("pooling", "avg") if unrecorded else None
    result = converter.convert(fx["files"][fmt], pooling=pooling)
    assert result.target == target
    assert {k: result.source_head[k] for k in expected} == expected
    assert result.config_origin == ("file" if fmt in CONFIG_FORMATS else "manifest")
    model = load_model(result.save(tmp_path / "m.safetensors"))
    out = torch_logits(model, fx["x"], result.preprocessing)
    assert out.shape == fx["logits"].shape
    err = rel_err(out, fx["logits"])
    assert err < TOL, f"{case} from {fmt}: outputs differ by {err:.2e} of their std"
    _bn_checked(model, result, fx["files"]["keras"])


def test_nesting_and_training_false_reported(tmp_path):
    fx = _fixture("functional")
    result = converter.convert(fx["files"]["keras"])
    assert result.nesting["layer"] == "resnet50" and result.nesting["training"] is False
    assert any("converter.bn.freeze" in n for n in result.notes)
    meta = load_model(result.save(tmp_path / "m.safetensors")).ckptport_metadata
    assert json.loads(meta["source.nesting"])["training"] is False
    assert "training=False" in meta["notes"]
    info = converter.inspect(fx["files"]["keras"])
    assert info["head"]["kind"] == "classifier" and info["head"]["num_classes"] == 5
    assert info["nesting"]["layer"] == "resnet50" and info["family"] == "ResNet v1"


def test_unrecorded_pooling_is_noted_and_checked():
    fx = _fixture("headless-max")
    noted = converter.convert(fx["files"]["tf-checkpoint"])
    assert noted.target_kwargs == {} and any("--pooling max" in n for n in noted.notes)
    with pytest.raises(converter.ConverterError, match="pools with max, not avg"):
        converter.convert(fx["files"]["keras"], pooling="avg")


def test_headless_timm_max_pooling(tmp_path):
    fx = _fixture("headless-max")
    result = converter.convert(fx["files"]["keras"], to="timm:resnet50")
    assert result.target_kwargs["global_pool"] == "max" and result.target_kwargs["num_classes"] == 0
    model = load_model(result.save(tmp_path / "m.safetensors"))
    assert rel_err(torch_logits(model, fx["x"], result.preprocessing), fx["logits"]) < TOL


def test_rich_user_head_refused(tmp_path, capsys):
    fx = make_wrapped_fixture("MobileNetV3Small", {}, "rich", 5, formats=["keras"])
    from converter.cli import main

    out = tmp_path / "m.safetensors"
    rc = main(["convert", fx["files"]["keras"], "-o", str(out)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    for layer in ("dense (Dense)", "batch_normalization (BatchNormalization)", "dense_1 (Dense)"):
        assert layer in lines[0]
    assert "--mapping" in lines[0] and "--to file.py:factory" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "case,fmt", [("functional", "keras"), ("sequential", "tf-checkpoint"), ("sequential", "h5")]
)
def test_verify_nested(case, fmt, tmp_path):
    from converter.verification import verify

    fx = _fixture(case)
    out = converter.convert(fx["files"][fmt]).save(tmp_path / "m.safetensors")
    report = verify(fx["files"][fmt], out, device="cpu")
    assert report.passed, report.to_dict()


def test_head_reset_on_nested_source(tmp_path):
    fx = _fixture("sequential")
    result = converter.convert(fx["files"]["keras"], num_classes=7)
    assert result.head_reset["dropped_source_layers"] == ["dense"]
    model = load_model(result.save(tmp_path / "m.safetensors"))
    assert model.classifier.weight.shape == (7, 576)  # on the base's 576 features (conv_head gone)
    assert torch_logits(model, fx["x"], result.preprocessing).shape == (len(fx["x"]), 7)
