"""Bad input: one clear line naming the file/tensor/layer, exit 2, no traceback, nothing left behind,
the input untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import ROOT, assert_clean_error, keras_build_args, make_keras_fixture, run_cli, sha

ALL = ["keras", "weights.h5", "h5", "tf-checkpoint", "savedmodel"]


@pytest.fixture(scope="module")
def r50():
    fn, kw, inp = keras_build_args("keras:ResNet50")
    return make_keras_fixture(fn, kw, inp, ["keras", "weights.h5", "h5", "h5-weights", "tf-checkpoint", "tf-names",
                                       "tf-layer-with-weights", "savedmodel"])


def test_empty_file(tmp_path, capsys):
    src = tmp_path / "model.keras"
    src.touch()
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, str(src), "empty", out=out)


def test_missing_file(tmp_path, capsys):
    rc, _, err = run_cli(["convert", tmp_path / "nope.keras", "-o", tmp_path / "o.safetensors"], capsys)
    assert_clean_error(rc, err, "nope.keras", "no such file")


def test_wrong_format(tmp_path, capsys):
    src = tmp_path / "model.h5"
    src.write_text("this is not a checkpoint\n")
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, str(src), "is not an HDF5 file: truncated or corrupt", out=out)
    other = src.with_suffix(".bin")
    other.write_text("this is not a checkpoint\n")
    rc, _, err = run_cli(["convert", other, "-o", out], capsys)
    assert_clean_error(rc, err, str(other), "not a format ckptport reads", out=out)


def test_damaged_keras_archives_say_what_they_are_not(tmp_path, capsys):
    """A truncated .keras zip, random bytes named .keras, and a .keras whose model.weights.h5
    member is truncated: one line each, the member named, no h5py internals."""
    import io
    import zipfile

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f["layers/dense/vars/0"] = np.zeros((64, 64), np.float32)
    inner = tmp_path / "inner.keras"
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", buf.getvalue()[:1000])
    truncated = tmp_path / "trunc.keras"
    truncated.write_bytes(inner.read_bytes()[:-40])
    noise = tmp_path / "noise.keras"
    noise.write_bytes(np.random.default_rng(0).bytes(100))
    for src, needle in [
        (truncated, "is not a valid .keras archive (zip): truncated or corrupt"),
        (noise, "is not a valid .keras archive (zip): truncated or corrupt"),
        (inner, "inner.keras: its member model.weights.h5 is truncated or not a valid HDF5"),
    ]:
        rc, _, err = run_cli(["inspect", src], capsys)
        assert_clean_error(rc, err, needle)
        assert "eof" not in err and "synchronously" not in err


@pytest.mark.parametrize("fmt", ["weights.h5", "h5", "keras"])
def test_truncated(fmt, r50, tmp_path, capsys):
    src_orig = Path(r50["files"][fmt])
    src = tmp_path / src_orig.name
    data = src_orig.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, src.name, out=out)
    assert any(w in err for w in ("truncated", "damaged", "not a valid"))


def test_wrong_architecture_target(r50, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", r50["files"]["keras"], "--to", "timm:tf_efficientnet_b0", "-o", out], capsys)
    assert_clean_error(rc, err, "keras:ResNet50", "cannot be converted to timm:tf_efficientnet_b0",
                       "torchvision:resnet50", out=out)


def test_unknown_target(r50, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", r50["files"]["keras"], "--to", "timm:nonexistent", "-o", out], capsys)
    assert_clean_error(rc, err, "timm has no model 'nonexistent'", out=out)  # checked up front
    rc, _, err = run_cli(["convert", r50["files"]["keras"], "--to", "timm:resnet18", "-o", out], capsys)
    assert_clean_error(rc, err, "no table converts to 'timm:resnet18'", "torchvision:resnet50",
                       "timm:resnet50", out=out)
    rc, _, err = run_cli(["convert", r50["files"]["keras"], "--to", "keras:ResNet50", "-o", out], capsys)
    assert_clean_error(rc, err, "names a keras model", out=out)


def test_missing_shard(r50, tmp_path, capsys):
    prefix = Path(r50["files"]["tf-checkpoint"])
    dst = tmp_path / "ck"
    dst.mkdir()
    shutil.copy(prefix.with_name(prefix.name + ".index"), dst / "ckpt.index")  # no data shard
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", dst / "ckpt", "-o", out], capsys)
    assert_clean_error(rc, err, "shard", out=out)


def test_shape_mismatch(tmp_path, capsys):
    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    fx = make_keras_fixture(fn, kw, inp, ["keras"])
    table = (ROOT / "mappings" / "mobilenetv3.toml").read_text()
    # a user table that claims the width-1.0 source fits the width-0.75 target
    table = table.replace('target = "timm:tf_mobilenetv3_small_100"', 'target = "timm:tf_mobilenetv3_small_075"', 1)
    (tmp_path / "bad.toml").write_text(table)
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", fx["files"]["keras"], "--mapping", tmp_path / "bad.toml",
                          "--to", "timm:tf_mobilenetv3_small_075", "-o", out], capsys)
    assert_clean_error(rc, err, "shape mismatch", "blocks.2.0.conv_pwl.weight", "(40, 96, 1, 1)", "(32, 96, 1, 1)",
                       out=out)


@pytest.mark.parametrize("value,needle", [(np.nan, "NaN"), (-1.0, "negative")])
def test_bad_bn_stats(value, needle, r50, tmp_path, capsys):
    src = tmp_path / "model.h5"
    shutil.copy(r50["files"]["h5"], src)
    with h5py.File(src, "r+") as f:
        ds = f["model_weights/conv2_block1_1_bn/conv2_block1_1_bn/moving_variance"]
        arr = ds[()]
        arr[3] = value
        ds[...] = arr
    before = sha(src)
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, "conv2_block1_1_bn", needle, out=out)
    assert sha(src) == before


def test_nan_in_a_large_kernel_is_refused_naming_it(r50, tmp_path, capsys):
    """A streamed conversion checks a large tensor once, on its way to the output: the error
    still names the target tensor and the source layer, and no output is left."""
    src = tmp_path / "model.h5"
    shutil.copy(r50["files"]["h5"], src)
    with h5py.File(src, "r+") as f:
        ds = f["model_weights/conv5_block1_2_conv/conv5_block1_2_conv/kernel"]
        arr = ds[()]
        assert arr.nbytes >= (64 << 10)  # spilled to the output as it is converted
        arr[1, 1, 7, 9] = np.inf
        ds[...] = arr
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, "conv5_block1_2_conv", "NaN/inf", "layer4.0.conv2.weight", out=out)
    # the source's background hash stopped with the conversion: a daemon thread left running at
    # exit could be frozen holding h5py's lock, which hung the interpreter's exit (seen here)
    import threading

    assert not [t for t in threading.enumerate() if t.name == "sha256"]


def test_renorm_refused(r50, tmp_path, capsys):
    src = tmp_path / "model.h5"
    shutil.copy(r50["files"]["h5"], src)
    with h5py.File(src, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        for lay in cfg["config"]["layers"]:
            if lay["config"]["name"] == "conv1_bn":
                lay["config"]["renorm"] = True
        f.attrs["model_config"] = json.dumps(cfg)
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", src, "-o", out], capsys)
    assert_clean_error(rc, err, "conv1_bn", "renorm", out=out)


def test_input_untouched_and_no_partial_on_write_failure(r50, tmp_path, monkeypatch):
    import converter
    from converter.formats import FORMATS

    src = Path(r50["files"]["keras"])
    before = sha(src)
    result = converter.convert(src)
    fmt = FORMATS.get("safetensors")

    def broken(path, tensors, metadata):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "write", broken)
    out = tmp_path / "out.safetensors"
    with pytest.raises(OSError):
        result.save(out)
    assert not out.exists() and not list(tmp_path.iterdir())
    assert sha(src) == before


def test_untrusted_pickle_is_never_executed(tmp_path, capsys):
    import torch

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"w": Evil()}, bad)
    rc, _, err = run_cli(["inspect", bad], capsys)
    assert_clean_error(rc, err, "evil.pt", "weights-only")
    assert not marker.exists()


def test_process_level_exit_code_and_no_traceback(tmp_path):
    src = tmp_path / "x.keras"
    src.write_bytes(b"PK\x03\x04garbage")
    proc = subprocess.run([sys.executable, "-m", "converter", "convert", str(src), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and "x.keras" in proc.stderr


def test_savedmodel_with_only_all_variables_is_refused(tmp_path, monkeypatch, capsys):
    """`_all_variables/<i>` is not in model.variables order: guessing would put same-shaped tensors
    (gamma/beta) on the wrong variables, so such a SavedModel is refused by name."""
    from converter.formats import tf_bundle

    sm = tmp_path / "sm"
    (sm / "variables").mkdir(parents=True)
    (sm / "saved_model.pb").write_bytes(b"x")
    (sm / "variables" / "variables.index").write_bytes(b"x")
    entries = {f"_all_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE": tf_bundle.BundleEntry(
        f"_all_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE", "float32", (4,), 0, 16 * i, 16, None) for i in range(3)}
    monkeypatch.setattr(tf_bundle, "read_index", lambda prefix: entries)
    out = tmp_path / "out.safetensors"
    rc, _, err = run_cli(["convert", sm, "-o", out], capsys)
    assert_clean_error(rc, err, "_all_variables", "re-export", out=out)


def test_failed_verify_keeps_existing_record_even_with_force(r50, tmp_path, capsys):
    record = tmp_path / "ref.safetensors"
    record.write_bytes(b"an earlier reference")
    rc, _, err = run_cli(["verify", r50["files"]["keras"], tmp_path / "missing.safetensors",
                          "--record", record, "--force"], capsys)
    assert rc == 2 and record.read_bytes() == b"an earlier reference"
    rc, _, err = run_cli(["verify", r50["files"]["keras"], tmp_path / "missing.safetensors", "--record", record], capsys)
    # an existing --record is refused before any work (formats.check_output, the one output policy)
    assert_clean_error(rc, err, str(record), "--force")
    assert record.read_bytes() == b"an earlier reference"


def test_options_are_flags_in_the_cli_and_keywords_in_the_api(tmp_path, capsys):
    """One message, two readers: the library says force=True, the CLI --force (never both)."""
    from converter.errors import OutputExistsError, cli_message, option
    from converter.formats import check_output

    existing = tmp_path / "out.safetensors"
    existing.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match=r"pass force=True to overwrite") as exc:
        check_output(existing, False, ())
    assert "--force" not in str(exc.value) and "pass --force to" in cli_message(exc.value)
    rc, _, err = run_cli(["convert", tmp_path / "src.keras", "-o", existing], capsys)
    assert_clean_error(rc, err, "exists; pass --force to overwrite it")
    assert "=True" not in err
    assert cli_message(ValueError(f"pass {option('accept_folded_bn=True')}")) == (
        "pass --accept-folded-bn"
    )
    with pytest.raises(KeyError):
        option("verbose=True")
