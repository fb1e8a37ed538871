"""The CLI's contract: light start-up, JSON outputs, inspect on sources and outputs, and conversion
of Keras files without TensorFlow or PyTorch in the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import keras_build_args, make_keras_fixture
from converter.cli import main


@pytest.fixture(scope="module")
def mnv3():
    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    return make_keras_fixture(fn, kw, inp, ["keras", "weights.h5", "h5"])


def _run_isolated(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_help_imports_no_framework():
    out = _run_isolated("""
import sys
from converter.cli import main
rc = main(['--help'])
heavy = [m for m in ('torch', 'tensorflow', 'keras', 'timm', 'torchvision') if m in sys.modules]
print('RC', rc, 'HEAVY', heavy)
""")
    assert "RC 0 HEAVY []" in out
    assert "convert" in out and "recalibrate" in out


@pytest.mark.parametrize("fmt", ["keras", "weights.h5", "h5"])
def test_converting_keras_files_imports_neither_framework(mnv3, fmt, tmp_path):
    out = _run_isolated(f"""
import sys
import converter
r = converter.convert({mnv3['files'][fmt]!r})
r.save({str(tmp_path / 'o.safetensors')!r})
print('HEAVY', [m for m in ('torch', 'tensorflow', 'keras', 'timm', 'torchvision') if m in sys.modules])
""")
    assert "HEAVY []" in out


def test_archs_json(capsys):
    assert main(["archs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["tables"]
    defaults = {r["source"]: r["target"] for r in rows if r["default"]}
    assert defaults["keras:ResNet50"] == "torchvision:resnet50"
    assert defaults["keras:EfficientNetB0"] == "timm:tf_efficientnet_b0"
    assert any(r["surgeries"] == ["resnet_v1_stride_on_1x1"] for r in rows)
    # one default per source, also for a source listed in two tables (MobileNetV2: timm, torchvision)
    assert sum(r["default"] for r in rows) == len({r["source"] for r in rows})
    assert defaults["keras:MobileNetV2"] == "timm:mobilenetv2_100"


def test_inspect_sources_say_where_config_comes_from(mnv3, capsys):
    assert main(["inspect", mnv3["files"]["weights.h5"], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "weights.h5" and info["architecture"] == "keras:MobileNetV3Small"
    assert info["config_origin"] == "manifest"
    bn = [lay for lay in info["layers"] if lay["class"] == "BatchNormalization"]
    assert bn and all(lay["bn"]["momentum"] == 0.999 and lay["bn"]["epsilon"] == 0.001 for lay in bn)
    assert main(["inspect", mnv3["files"]["keras"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config_origin"] == "file"


def test_convert_json_verify_and_inspect_output(mnv3, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc = main(["convert", mnv3["files"]["keras"], "-o", str(out), "--json", "--verify"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and info["verification"]["passed"] is True
    assert info["target"] == "timm:tf_mobilenetv3_small_100" and info["bn_momentum_torch"] == [pytest.approx(0.001)]
    assert main(["inspect", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["metadata"]["target"] == "timm:tf_mobilenetv3_small_100"
    assert all(c["momentum"] == pytest.approx(0.001) and c["eps"] == 0.001 for c in meta["bn_config"].values())


def test_convert_head_reset_verify_compares_up_to_the_head(mnv3, tmp_path, capsys):
    """Regression: `convert --num-classes 7 --verify` crashed comparing 1000 Keras logits with 7."""
    import converter
    from converter.cli.verify import show
    from converter.verification import report_from_dict

    out = tmp_path / "m7.safetensors"
    rc = main(["convert", mnv3["files"]["keras"], "-o", str(out), "--num-classes", "7", "--verify", "--json"])
    v = json.loads(capsys.readouterr().out)["verification"]
    assert rc == 0 and v["passed"] is True, v["first_divergent"]
    assert v["output"]["comparable"] is False and v["output"]["passed"] is None
    assert v["excluded"] == [{"module": "classifier", "source_layers": ["logits"], "reason": "head reset to 7 classes"}]
    assert any("not comparable: head reset to 7 classes" in n for n in v["notes"])
    # every layer pair up to the head was compared: all of a full conversion's taps but the head's
    full = [list(t) for t in converter.convert(mnv3["files"]["keras"]).taps]
    assert [[r["source_layer"], r["target_module"]] for r in v["layers"]] == [t for t in full if t[1] != "classifier"]
    assert len(v["layers"]) == len(full) - 1 and all(r["passed"] for r in v["layers"])
    show(report_from_dict(v))
    err = capsys.readouterr().err
    assert "not comparable: head reset to 7 classes" in err and "PASS" in err


def test_convert_verify_passes_mapping_through(tmp_path, capsys):
    """`convert --mapping T --verify` verifies with T: the good table passes (exit 0), the table with
    the planted Flatten bug fails at fc (exit 1); without T verification could not even run (exit 2)."""
    from helpers import make_tiny_keras, tiny_table

    src = make_tiny_keras(tmp_path / "tiny.keras")
    for fc, expect_rc in (("dense_after_flatten", 0), ("dense", 1)):
        tbl = tmp_path / f"{fc}.toml"
        tbl.write_text(tiny_table(fc))
        rc = main(["convert", str(src), "-o", str(tmp_path / f"{fc}.safetensors"), "--mapping", str(tbl),
                   "--verify", "--json"])
        v = json.loads(capsys.readouterr().out)["verification"]
        assert rc == expect_rc, capsys.readouterr().err
        assert v["output"]["comparable"] is True
        if expect_rc:
            assert (v["first_divergent"]["source_layer"], v["first_divergent"]["target_module"]) == ("fc", "fc")


def test_verify_options_round_trip_through_the_cli_parser(tmp_path):
    """VerifyOptions.to_argv() and `ckptport verify`'s options come from the same field metadata:
    every field, set to a non-default value, survives to_argv -> click parser -> VerifyOptions."""
    from dataclasses import fields

    from converter.cli.verify import command, options_from_params
    from converter.verification import VerifyOptions

    sample = VerifyOptions(inputs=tmp_path / "x.npy", batch=3, seed=7, rtol=2.5e-5, atol=1e-6, train_step=True,
                           device="cpu", record=tmp_path / "r.safetensors", against=tmp_path / "a.safetensors",
                           mapping=tmp_path / "t.toml", source_model="pkg.mod:build", format="weights.h5",
                           pooling="max", force=True)
    unset = [f.name for f in fields(VerifyOptions) if getattr(sample, f.name) == f.default]
    assert not unset, f"give {unset} a non-default value here so the round trip covers them"
    ctx = command.make_context("verify", ["src.keras", "out.safetensors", *sample.to_argv()])
    assert options_from_params(ctx.params) == sample
    assert VerifyOptions().to_argv() == ["--batch", "4", "--seed", "0", "--atol", "0.0", "--device", "auto"]


def test_convert_verify_passes_the_source_format(mnv3, tmp_path, monkeypatch, capsys):
    import converter.verification as verification

    seen = []

    def fake_verify(src, converted, options=None, **kwargs):
        seen.append(options)
        out = {"comparable": True, "max_abs": 0.0, "rel": 0.0, "max_rel": 0.0, "cosine": 1.0, "passed": True}
        return verification.VerificationReport([], out, 1e-4, 0.0, 4, [4, 224, 224, 3], "logits")

    monkeypatch.setattr(verification, "verify", fake_verify)
    rc = main(["convert", mnv3["files"]["weights.h5"], "-o", str(tmp_path / "m.safetensors"), "--format",
               "weights.h5", "--verify", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["verification"]["passed"] is True
    assert [(o.format, o.mapping, o.source_model) for o in seen] == [("weights.h5", None, None)]
