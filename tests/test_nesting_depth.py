"""Issue 8 leftovers: nesting at any depth (ConvNeXt, which nests Sequential blocks itself, inside
the user's model; an application inside a model nested in the user's), verify's --pooling, and
refused families in their re-headed / headless / nested forms."""

from __future__ import annotations

import pytest

import converter
from helpers import assert_clean_error, make_wrapped_fixture, rel_err, run_cli, torch_logits
from converter.model import load_model
from converter.refusals import refusal_for

TOL = 1e-4  # max abs error relative to the std of the Keras outputs, as in test_convert_e2e.py
FORMATS = ["keras", "weights.h5", "h5", "tf-checkpoint", "savedmodel"]
CASES = {
    # id: (keras.applications fn, wrap, input size, default target, base path in .keras/.h5)
    "convnext-in-sequential": (
        "ConvNeXtTiny",
        "seq",
        32,
        "timm:convnext_tiny",  # its LayerNorm before the user's pooling: timm head_norm_first
        "convnext_tiny",
    ),
    "two-levels": (
        "MobileNetV3Small",
        "deep",
        64,
        "timm:tf_mobilenetv3_small_100",
        "features/MobileNetV3Small",
    ),
}


def _fixture(case: str, formats: list[str] | None = None) -> dict:
    fn, wrap, size, _, _ = CASES[case]
    return make_wrapped_fixture(fn, {}, wrap, 5, size=size, formats=formats)


def _depth_params():
    for case in CASES:
        for fmt in FORMATS:
            yield pytest.param(case, fmt, id=f"{case}-{fmt}")


@pytest.mark.parametrize("case,fmt", list(_depth_params()))
def test_nested_at_any_depth_converts_and_matches(case, fmt, tmp_path):
    fx = _fixture(case)
    _, _, _, target, path = CASES[case]
    result = converter.convert(fx["files"][fmt])
    assert result.target == target
    assert result.source_head["kind"] == "classifier" and result.source_head["num_classes"] == 5
    if fmt in ("keras", "h5"):  # the formats that store names: the nesting path is named
        assert result.nesting["layer"] == path
    model = load_model(result.save(tmp_path / "m.safetensors"))
    err = rel_err(torch_logits(model, fx["x"], result.preprocessing), fx["logits"])
    assert err < TOL, f"{case} from {fmt}: outputs differ by {err:.2e} of their std"


HEAD_FORMS = {
    # id: (wrap, kwargs, classes, target kwargs): .keras only (the Sequential form above runs in
    # every format; these differ only in the head, which the .keras config states)
    "convnext-in-functional": ("fn", {}, 5, {"head_norm_first": True, "num_classes": 5}),
    "convnext-headless-avg": ("none", {"include_top": False, "pooling": "avg"}, None, {}),
}


@pytest.mark.parametrize("case", list(HEAD_FORMS))
def test_convnext_without_its_top_converts_and_matches(case, tmp_path):
    """Keras' include_top=False ConvNeXt ends with an auto-named LayerNormalization: after its own
    pooling when stand-alone (timm's head.norm), before the user's pooling when nested (timm's
    norm_pre, head_norm_first=True); LN eps 1e-6 carried into either."""
    wrap, kwargs, classes, target_kwargs = HEAD_FORMS[case]
    # 64 px: a 2x2 last map, where the LayerNorm before and after the pooling differ (at 32 px,
    # the table's size, the map is 1x1 and both placements compute the same)
    fx = make_wrapped_fixture("ConvNeXtTiny", kwargs, wrap, 5, size=64, formats=["keras"])
    result = converter.convert(fx["files"]["keras"])
    assert result.target == "timm:convnext_tiny"
    assert target_kwargs.items() <= result.target_kwargs.items()
    assert result.source_head["num_classes"] == classes
    model = load_model(result.save(tmp_path / "m.safetensors"))
    norm, unused = ("norm_pre", "head.norm") if result.nesting else ("head.norm", "norm_pre")
    modules = dict(model.named_modules())
    assert modules[norm].eps == 1e-6 and not hasattr(modules.get(unused), "weight")  # one LN
    err = rel_err(torch_logits(model, fx["x"], result.preprocessing), fx["logits"])
    assert err < TOL, f"{case}: outputs differ by {err:.2e} of their std"


def test_inspect_and_convert_name_the_nesting_path(tmp_path, capsys):
    fx = _fixture("two-levels")
    rc, _, err = run_cli(["inspect", fx["files"]["keras"]], capsys)
    text = " ".join(err.split())
    assert rc == 0 and "'MobileNetV3Small' of the nested model 'features'" in text, err
    rc, _, err = run_cli(
        ["convert", fx["files"]["keras"], "-o", tmp_path / "m.safetensors"], capsys
    )
    text = " ".join(err.split())
    assert rc == 0 and "'MobileNetV3Small' of the nested model 'features'" in text, err


@pytest.mark.slow  # a Keras subprocess and a train step: ~60 s on the shared 2-core machine
def test_verify_two_levels_deep_with_train_step(tmp_path):
    """Layer by layer and one training-mode step, the BN layers two models deep included."""
    from converter.verification import verify

    fx = _fixture("two-levels")
    result = converter.convert(fx["files"]["keras"])
    report = verify(fx["files"]["keras"], result.save(tmp_path / "m.safetensors"), train_step=True)
    assert report.passed, report.to_dict()
    # every BN module's update compared (before: none, the BNs were not the outer model's layers)
    assert {b.target_module for b in report.train_step} == set(result.bn_config)


def test_verify_takes_the_pooling_convert_was_given(tmp_path):
    """A TF checkpoint does not record a headless base's pooling: `convert --pooling max` and
    `verify --pooling max` use it alike (verify would rebuild the Keras model with avg)."""
    from converter.verification import verify

    fx = make_wrapped_fixture(
        "MobileNetV3Small",
        {"include_top": False, "pooling": "max"},
        formats=["keras", "tf-checkpoint"],
    )
    src = fx["files"]["tf-checkpoint"]
    out = converter.convert(src, pooling="max").save(tmp_path / "m.safetensors")
    report = verify(src, out, pooling="max")
    assert report.passed, report.to_dict()


REFUSED = {
    # id: (fn, kwargs, wrap, formats, what the refusal says about the head / nesting)
    "nested": ("ResNet50V2", {}, "fn", ["keras", "tf-checkpoint"], "the base is"),
    "headless": (
        "ResNet50V2",
        {"include_top": False, "pooling": "max"},
        "none",
        ["keras", "weights.h5"],
        "headless, pooling max",
    ),
}


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=[pytest.mark.slow] if c == "headless" else []) for c in REFUSED],
)  # headless: one more ResNet50V2 fixture (~30 s cold); the nested case covers the same code
def test_refused_family_nested_or_headless_is_named(case, tmp_path, capsys):
    fn, kwargs, wrap, formats, says = REFUSED[case]
    fx = make_wrapped_fixture(fn, kwargs, wrap, 5, size=32, formats=formats)
    refusal = refusal_for("keras:ResNet50V2")
    for fmt in formats:
        out = tmp_path / f"{fmt}.safetensors"
        rc, _, err = run_cli(["convert", fx["files"][fmt], "-o", out], capsys)
        assert_clean_error(rc, err, "(keras:ResNet50V2: ", refusal.reason, out=out)
        if fmt == "keras":
            assert says in err


def test_archs_lists_refusals(capsys):
    import json

    rc, out, _ = run_cli(["archs", "--json"], capsys)
    refused = {s for r in json.loads(out)["refusals"] for s in r["sources"]}
    assert rc == 0 and {"keras:ResNet50V2", "keras:NASNetMobile", "keras:NASNetLarge"} <= refused
    rc, _, err = run_cli(["archs"], capsys)
    assert rc == 0 and "keras:NASNetMobile" in err
