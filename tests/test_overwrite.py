"""No command overwrites a file without --force: for every output a command writes, an existing
file makes it exit 2 with one line naming the file and --force, and leaves the file's bytes as they
were; with --force the command runs and replaces the file.

To cover a new command (``export``, ``port``, ...), add one ``Writer`` to WRITERS."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest

from helpers import assert_clean_error, keras_build_args, make_keras_fixture

PLACEHOLDER = b"precious bytes that must survive a refused write"


class Inputs(NamedTuple):
    """Real files for the commands to work on, built once for the module."""

    src: Path  # a Keras model
    converted: Path  # its conversion (a checkpoint ckptport wrote)
    reference: Path  # a verify --record reference for it
    data: Path  # an NCHW batch for recalibrate


class Writer(NamedTuple):
    argv: Callable[[Inputs, Path], list]  # the command line (without --force) writing to a path
    output_name: str  # the file it writes
    exit_with_force: int = 0  # the exit code once it may write
    also: tuple[str, ...] = ()  # other files the command writes beside it (refused the same way)


WRITERS = {
    "convert -o": Writer(lambda f, out: ["convert", f.src, "-o", out], "model.safetensors"),
    "verify --record": Writer(
        lambda f, out: ["verify", f.src, f.converted, "--record", out, "--device", "cpu"],
        "reference.safetensors",
    ),
    "verify --html": Writer(
        lambda f, out: ["verify", f.converted, "--against", f.reference, "--html", out],
        "report.html",
    ),
    "draft -o": Writer(
        lambda f, out: ["draft", f.src, "--to", "timm:tf_mobilenetv3_small_100", "-o", out],
        "model.mapping.toml",
    ),
    "recalibrate -o": Writer(
        lambda f, out: ["recalibrate", f.converted, "--data", f.data, "--batch-size", "2"]
        + ["--num-batches", "2", "-o", out],
        "recalibrated.safetensors",
    ),
    "port -o": Writer(
        lambda f, out: ["port", f.src, "-o", out, "--no-verify"],
        "model.py",
        also=("model.safetensors",),
    ),
    "port -o (weights beside it)": Writer(
        lambda f, out: ["port", f.src, "-o", out.with_suffix(".py"), "--no-verify"],
        "model.safetensors",
        also=("model.py",),
    ),
    "export -o": Writer(
        lambda f, out: ["export", f.converted, "--against", f.reference, "-o", out], "model.onnx"
    ),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    from converter import convert, verify

    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    fx = make_keras_fixture(fn, kw, inp, ["keras"])
    d = tmp_path_factory.mktemp("inputs")
    converted = convert(fx["files"]["keras"]).save(d / "model.safetensors")
    reference = d / "reference.safetensors"
    assert verify(fx["files"]["keras"], converted, record=reference, device="cpu").passed
    data = d / "batch.npy"
    np.save(data, np.ascontiguousarray(fx["x"].transpose(0, 3, 1, 2)[:4], dtype=np.float32))
    return Inputs(Path(fx["files"]["keras"]), converted, reference, data)


@pytest.mark.parametrize("name", WRITERS)
def test_refuses_to_overwrite_without_force(name, inputs, tmp_path, cli):
    writer = WRITERS[name]
    out = tmp_path / writer.output_name
    out.write_bytes(PLACEHOLDER)
    before = {p: p.read_bytes() for p in inputs}

    rc, _, err = cli(*writer.argv(inputs, out))
    assert_clean_error(rc, err, str(out), "--force")
    assert out.read_bytes() == PLACEHOLDER
    assert sorted(tmp_path.iterdir()) == [out], "a partial file was left behind"

    rc, _, err = cli(*writer.argv(inputs, out), "--force")
    assert rc == writer.exit_with_force, err
    assert out.read_bytes() != PLACEHOLDER and out.stat().st_size > 0
    written = sorted([out, *(tmp_path / name for name in writer.also)])
    assert sorted(tmp_path.iterdir()) == written, "a partial file was left behind"
    assert {p: p.read_bytes() for p in inputs} == before, "an input was touched"
