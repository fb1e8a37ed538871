"""Verification: clean conversions pass (inference and --train-step) for every table; planted bugs
are caught and located at the right layer; recorded references; the TF/torch process hazard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import converter
from helpers import (ROOT, assert_clean_error, keras_build_args, make_keras_fixture, make_tiny_keras, run_cli,
                     tiny_table)
from converter import formats
from converter.cli import main
from converter.tables import builtin_tables
from converter.verification import verify

# one representative per table: parametrized over the registry, so a new table is verified too
REPRESENTATIVE = [(t, t.variants[0]) for t in builtin_tables()]
# layer by layer with a train step in the slow suite only: InceptionResNetV2 (55M parameters, 244
# convs) takes ~58 s here on 2 cores with its fixture cached
SLOW_VERIFY = {"keras:InceptionResNetV2"}


def converted(source_id: str, tmp_path: Path, to: str | None = None) -> tuple[dict, Path]:
    fn, kw, inp = keras_build_args(source_id)
    fx = make_keras_fixture(fn, kw, inp, ["keras"])
    out = converter.convert(fx["files"]["keras"], to).save(tmp_path / "model.safetensors")
    return fx, out


def plant(path: Path, dst: Path, tensors=None, meta=None) -> Path:
    """Copy a converted checkpoint with some tensors or metadata changed (a planted bug)."""
    raw = formats.read(path)
    t = {k: v.load() for k, v in raw.tensors.items()}
    m = dict(raw.metadata)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    return formats.write(dst, t, m)


@pytest.mark.parametrize(
    "table,variant",
    [
        pytest.param(t, v, id=v.source, marks=[pytest.mark.slow] if v.source in SLOW_VERIFY else [])
        for t, v in REPRESENTATIVE
    ],
)
def test_clean_conversion_passes_inference_and_train_step(table, variant, tmp_path):
    fx, out = converted(variant.source, tmp_path, variant.target)
    # verify's default tolerance: 1e-4, or the table's [verify] rtol where the family's own float32
    # rounding exceeds it (InceptionV3 at 75 px: 1.5e-4 float32-vs-float64 at its last taps)
    report = verify(fx["files"]["keras"], out, train_step=True, device="cpu")
    assert report.rtol == table.verify.get("rtol", 1e-4)
    assert report.passed, report.first_divergent
    assert report.layers and all(r.passed for r in report.layers)
    n_bn = len(json.loads(formats.read(out).metadata["bn_config"]))
    assert report.train_step_passed and len(report.train_step) == n_bn
    if n_bn:  # a BN-free family (VGG) has no update to compare; its layers are verified above
        # the naive variance comparison would have failed: the Bessel term is really accounted for
        assert max(b.var_rel_uncorrected for b in report.train_step) > 10 * max(b.var_rel for b in report.train_step)


def test_planted_conv_kernel_transposed(tmp_path):
    fx, out = converted("keras:MobileNetV3Small", tmp_path)

    def bug(t):
        w = t["blocks.1.0.conv_dw.weight"]
        t["blocks.1.0.conv_dw.weight"] = np.ascontiguousarray(w.transpose(0, 1, 3, 2))  # HW swapped

    bad = plant(out, tmp_path / "bad.safetensors", tensors=bug)
    report = verify(fx["files"]["keras"], bad, device="cpu")
    assert not report.passed
    assert report.first_divergent["target_module"] == "blocks.1.0.conv_dw"
    assert report.first_divergent["source_layer"] == "expanded_conv_1_depthwise"


def test_planted_unconverted_momentum_caught_by_train_step(tmp_path):
    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    victim = "blocks.2.0.bn2"

    def bug(m):
        bn = json.loads(m["bn_config"])
        bn[victim]["momentum"] = bn[victim]["keras_momentum"]  # 0.999 pasted into PyTorch
        m["bn_config"] = json.dumps(bn)

    bad = plant(out, tmp_path / "bad.safetensors", meta=bug)
    assert verify(fx["files"]["keras"], bad, device="cpu").passed  # inference cannot see momentum
    report = verify(fx["files"]["keras"], bad, train_step=True, device="cpu")
    assert not report.passed and not report.train_step_passed
    failing = [b.target_module for b in report.train_step if not b.passed]
    assert failing == [victim]
    assert report.first_divergent["target_module"] == victim


def test_planted_wrong_eps(tmp_path):
    fx, out = converted("keras:EfficientNetB0", tmp_path)
    raw = formats.read(out)
    # the BN whose variance is smallest: where eps matters most
    var = {k[: -len(".running_var")]: raw.tensors[k].load().mean() for k in raw.tensors if k.endswith("running_var")}
    victim = min(var, key=var.get)

    def bug(m):
        bn = json.loads(m["bn_config"])
        bn[victim]["eps"] = 1e-5  # PyTorch's default instead of Keras' 1e-3
        m["bn_config"] = json.dumps(bn)

    report = verify(fx["files"]["keras"], plant(out, tmp_path / "bad.safetensors", meta=bug), device="cpu")
    assert not report.passed
    assert report.first_divergent["target_module"].startswith(victim)


def test_planted_dense_after_flatten_without_reorder(tmp_path):
    src = make_tiny_keras(tmp_path / "tiny.keras")
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(tiny_table("dense_after_flatten"))
    bad.write_text(tiny_table("dense"))
    for tbl, expect in ((good, True), (bad, False)):
        out = converter.convert(src, mapping=tbl).save(tmp_path / f"{tbl.stem}.safetensors")
        report = verify(src, out, mapping=tbl, device="cpu")
        assert report.passed is expect
        if not expect:
            assert report.first_divergent["source_layer"] == "fc"
            assert report.first_divergent["target_module"] == "fc"


def test_planted_symmetric_padding_on_stride2_conv(tmp_path):
    import torch

    from converter.surgeries import SURGERIES

    name = "test_symmetric_padding_blocks_1_0_conv_dw"
    if name not in SURGERIES:
        @SURGERIES.register(name)
        def _symmetric(model):
            old = model.blocks[1][0].conv_dw  # timm Conv2dSame, stride 2: TF pads 0 before, 1 after
            new = torch.nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride,
                                  padding=old.kernel_size[0] // 2, groups=old.groups, bias=old.bias is not None)
            model.blocks[1][0].conv_dw = new

    fx, out = converted("keras:MobileNetV3Small", tmp_path)

    def bug(m):
        m["surgeries"] = json.dumps(json.loads(m["surgeries"]) + [{"name": name}])

    report = verify(fx["files"]["keras"], plant(out, tmp_path / "bad.safetensors", meta=bug), device="cpu")
    assert not report.passed
    assert report.first_divergent["target_module"] == "blocks.1.0.conv_dw"


def test_record_then_against_without_tensorflow(tmp_path, capsys):
    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    ref = tmp_path / "ref.safetensors"
    first = verify(fx["files"]["keras"], out, record=ref, train_step=True, device="cpu")
    assert first.passed and ref.exists()
    # a process where TensorFlow cannot even be imported
    code = f"""
import sys
sys.modules['tensorflow'] = None; sys.modules['keras'] = None
from converter.verification import verify
r = verify(None, {str(out)!r}, against={str(ref)!r}, train_step=True, device='cpu')
assert r.passed, r.first_divergent
print('OK', len(r.layers))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]
    # existing --record/--html outputs are refused by the atomic writer: exit 2, one line, untouched
    for flag, name in (("--record", "old.safetensors"), ("--html", "old.html")):
        existing = tmp_path / name
        existing.write_text("old")
        argv = ["verify", str(out), "--against", str(ref), flag, str(existing), "--device", "cpu"]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "exists" in err and "--force" in err and len(err.splitlines()) == 1, err
        assert existing.read_text() == "old"
        assert main([*argv, "--force", "--json"]) == 0 and existing.read_bytes() != b"old"
        capsys.readouterr()


def test_cli_exit_codes_json_and_html(tmp_path, capsys):
    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    html = tmp_path / "report.html"
    rc = main(["verify", fx["files"]["keras"], str(out), "--json", "--html", str(html), "--device", "cpu"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["passed"] is True and data["first_divergent"] is None
    assert {"source_layer", "target_module", "rel", "max_abs", "cosine"} <= set(data["layers"][0])
    text = html.read_text()
    assert "<svg" in text and "tolerance" in text and "PASS" in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")

    bad = plant(out, tmp_path / "bad.safetensors", tensors=lambda t: t.__setitem__(
        "conv_stem.weight", np.ascontiguousarray(t["conv_stem.weight"].transpose(0, 1, 3, 2))))
    rc = main(["verify", fx["files"]["keras"], str(bad), "--json", "--device", "cpu"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 1 and data["passed"] is False
    assert data["first_divergent"]["source_layer"] == "conv" and data["first_divergent"]["target_module"] == "conv_stem"
    rc = main(["verify", fx["files"]["keras"], str(tmp_path / "missing.safetensors")])
    assert rc == 2


def test_tensorflow_imported_first_verify_isolates_itself(tmp_path):
    """TensorFlow then torchvision in one process segfaults on this stack (at the torchvision import);
    verify sees TF is loaded and runs itself in a clean process, so a user who imported TF first is safe.
    This test FAILS (exit -11) if that isolation is removed. Options (format included) and an inputs
    array reach the clean process."""
    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    code = f"""
import numpy as np
import tensorflow, keras
import converter
x = np.random.default_rng(3).uniform(0, 255, (2, 128, 128, 3)).astype('float32')
r = converter.verify({fx['files']['keras']!r}, {str(out)!r}, device='cpu', format='keras', inputs=x)
assert r.passed and r.batch == 2, r.first_divergent
print('OK')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-2000:]


def test_assert_equivalent(tmp_path):
    from converter.testing import assert_equivalent

    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    assert assert_equivalent(fx["files"]["keras"], out, device="cpu").passed
    bad = plant(out, tmp_path / "bad.safetensors", tensors=lambda t: t.__setitem__("classifier.bias", t["classifier.bias"] + 1))
    with pytest.raises(AssertionError, match="classifier|model output"):
        assert_equivalent(fx["files"]["keras"], bad, device="cpu")


def test_load_model_refuses_instead_of_crashing_after_tensorflow(tmp_path):
    fx, out = converted("keras:MobileNetV3Small", tmp_path)
    code = f"""
import tensorflow
from converter.model import load_model
from converter.errors import ConverterError
try:
    load_model({str(out)!r})
except ConverterError as e:
    print('REFUSED', 'imported before torchvision' in str(e))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "REFUSED True" in proc.stdout, proc.stderr[-2000:]


# ------------------------------------------------ legacy .h5 (model.save("x.h5")): config rebuilt
def legacy_h5(tmp_path: Path, edit=None) -> Path:
    """A copy of the MobileNetV3Small legacy .h5 (saved by Keras 3), its stored model config edited
    by ``edit(config)`` (the weights untouched)."""
    import h5py

    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    src = Path(make_keras_fixture(fn, kw, inp, ["keras", "weights.h5", "h5"])["files"]["h5"])
    dst = tmp_path / "model.h5"
    dst.write_bytes(src.read_bytes())
    if edit:
        with h5py.File(dst, "r+") as f:
            config = json.loads(f.attrs["model_config"])
            edit(config)
            f.attrs["model_config"] = json.dumps(config).encode()
    return dst


def _as_keras_2_0(config: dict) -> None:
    assert config["class_name"] == "Functional"
    config["class_name"] = "Model"  # Keras 2.0-2.2 named functional models `Model`


@pytest.mark.parametrize("edit", [None, _as_keras_2_0], ids=["keras3", "class-Model"])
def test_verify_legacy_h5(edit, tmp_path):
    """Keras 3 writes its functional ops (MobileNetV3's `x + 3.0`) to a legacy config without their
    module: Keras' own legacy loader takes them for merge layers; verify rebuilds them as ops."""
    src = legacy_h5(tmp_path, edit)
    out = converter.convert(src).save(tmp_path / "m.safetensors")
    report = verify(src, out, device="cpu")
    assert report.passed and report.layers, report.first_divergent


SENTINEL_CODE = "lambda x: open({path!r}, 'w').write('executed') and x"


def _with_layer(class_name: str, sentinel: Path):
    """Edit: the first Activation layer replaced by ``class_name`` holding Keras 2's marshalled
    lambda (which would write ``sentinel`` if it were ever loaded and called)."""
    import base64
    import marshal

    fn = eval(SENTINEL_CODE.format(path=str(sentinel)))
    code = base64.encodebytes(marshal.dumps(fn.__code__)).decode("ascii")

    def edit(config):
        entry = next(e for e in config["config"]["layers"] if e["class_name"] == "Activation")
        entry["class_name"] = class_name
        entry["config"].pop("activation")
        entry["config"].update(function=[code, None, None], function_type="lambda", arguments={})
        return entry["name"]

    return edit


@pytest.mark.parametrize("class_name", ["Lambda", "MyCustomLayer"])
def test_verify_legacy_h5_refuses_code_layers(class_name, tmp_path, capsys):
    sentinel = tmp_path / "lambda-ran"
    src = legacy_h5(tmp_path, _with_layer(class_name, sentinel))
    out = converter.convert(src).save(tmp_path / "m.safetensors")
    rc, _, err = run_cli(["verify", src, out, "--device", "cpu"], capsys)
    assert_clean_error(rc, err, "layer 'activation'", f"({class_name})", "--source-model")
    assert not sentinel.exists()
