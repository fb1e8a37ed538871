"""The CLI's contract: light start-up, JSON outputs, inspect on sources and outputs, and conversion
of Keras files without TensorFlow or PyTorch in the process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import keras_build_args, make_keras_fixture
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
