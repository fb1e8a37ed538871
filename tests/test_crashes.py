"""Crashes and wrong exit codes found by use (issue 7), each through the CLI: one line, exit 2 (or
the named code), nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from converter import formats
from helpers import TINY_TARGET, make_tiny_keras, tiny_table
from converter.cli import main
from converter.errors import ExitCode, MappingError
from converter.model import load_model

ROOT = Path(__file__).resolve().parents[1]
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The Keras twin of fixtures/tiny_models.py:tiny_flatten as .keras, its table, one conversion."""
    d = tmp_path_factory.mktemp("tiny")
    src = make_tiny_keras(d / "tiny.keras")
    table = d / "tiny.toml"
    table.write_text(tiny_table())
    out = d / "tiny.safetensors"
    assert main(["convert", str(src), "--mapping", str(table), "-o", str(out)]) == 0
    return {"src": src, "table": table, "out": out, "dir": d}


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line, got:\n{err}"
    return lines[0]


def ckptport(*args: str, **kw) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (import order as a user's shell gets it)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True, env=env,
                          **kw)


def without_key(src: Path, dst: Path, drop: str) -> Path:
    raw = formats.read(src)
    tensors = {k: t.load() for k, t in raw.tensors.items() if k != drop}
    return formats.write(dst, tensors, dict(raw.metadata))


def test_audit_of_checkpoint_missing_a_key_is_one_line_exit_2(tiny, capsys):
    bad = without_key(tiny["out"], tiny["dir"] / "missing.safetensors", "bn.running_var")
    rc = main(["audit", str(bad)])
    line = one_line(capsys.readouterr().err)
    assert rc == ExitCode.ERROR
    assert str(bad) in line and "bn.running_var" in line and "missing" in line


def test_load_model_reports_missing_and_unexpected_keys(tiny):
    raw = formats.read(tiny["out"])
    tensors = {k: t.load() for k, t in raw.tensors.items() if k != "fc.bias"}
    tensors["fc.extra"] = tensors["fc.weight"]
    bad = formats.write(tiny["dir"] / "unexpected.safetensors", tensors, dict(raw.metadata))
    with pytest.raises(MappingError) as exc:
        load_model(bad)
    msg = str(exc.value)
    assert "1 missing keys: fc.bias" in msg and "1 unexpected keys: fc.extra" in msg


def test_load_model_reports_shape_mismatch(tiny):
    raw = formats.read(tiny["out"])
    tensors = {k: t.load() for k, t in raw.tensors.items()}
    tensors["fc.bias"] = tensors["fc.bias"][:3]
    bad = formats.write(tiny["dir"] / "shape.safetensors", tensors, dict(raw.metadata))
    with pytest.raises(MappingError, match=r"fc.bias \(3,\) \(model: \(5,\)\)"):
        load_model(bad)


def test_source_model_with_file_target_in_fresh_process(tiny, tmp_path):
    """--source-model runs a Keras factory (TensorFlow imported) before the file.py target is built: the
    import-order guard used to refuse every such conversion."""
    out = tmp_path / "out.safetensors"
    proc = ckptport("convert", str(tiny["src"]), "--source-model", f"{ROOT / 'fixtures' / 'keras_tiny.py'}:build",
                    "--mapping", str(tiny["table"]), "--to", TINY_TARGET, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert formats.read(out).tensors.keys() == formats.read(tiny["out"]).tensors.keys()


@pytest.mark.parametrize("spec", ["torchvision.models:resnet18", "torchvision:resnet18"])
def test_audit_accepts_every_spec_form(spec, capsys):
    rc = main(["audit", spec, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == ExitCode.OK and report["modules_checked"] == 20


def test_internal_error_is_one_line_exit_70(monkeypatch, capsys):
    import converter.tables

    def boom():
        raise RuntimeError("planted bug")

    monkeypatch.setattr(converter.tables, "builtin_tables", boom)
    rc = main(["archs"])
    line = one_line(capsys.readouterr().err)
    assert rc == ExitCode.INTERNAL and "planted bug" in line and "-v" in line
    rc = main(["-v", "archs"])
    assert rc == ExitCode.INTERNAL and "Traceback" in capsys.readouterr().err


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from converter.formats.safetensors_file import SafetensorsStream
    from converter.cli import main

    real = SafetensorsStream.finish  # the streamed write's last step (the header)

    def slow(self, metadata):
        real(self, metadata)
        Path(sys.argv[1]).write_text("writing")
        time.sleep(60)

    SafetensorsStream.finish = slow
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.parametrize(
    "sig,io",
    [(signal.SIGTERM, "auto"), (signal.SIGHUP, "auto"), (signal.SIGINT, "auto"),
     (signal.SIGTERM, "direct")],
)  # fmt: skip
def test_signal_during_write_leaves_nothing(tiny, tmp_path, sig, io):
    out = tmp_path / "out.safetensors"
    ready = tmp_path / "ready"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITER)
    proc = subprocess.Popen([sys.executable, str(script), str(ready), "convert", str(tiny["src"]), "--mapping",
                             str(tiny["table"]), "-o", str(out), "--output-io", io],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "writer never started"
    assert list(tmp_path.glob(".out.safetensors.*.partial")), "the temporary file should exist mid-write"
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert rc == (ExitCode.INTERRUPTED if sig == signal.SIGINT else 128 + sig), err
    assert "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.safetensors.*")), "a partial file survived the signal"


def test_relative_and_absolute_file_targets_are_the_same(tiny, tmp_path, monkeypatch):
    """The table names the target by absolute path; `--to ./fixtures/tiny_models.py:tiny_flatten` is it."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "rel.safetensors"
    rc = main(["convert", str(tiny["src"]), "--mapping", str(tiny["table"]), "--to",
               "./fixtures/tiny_models.py:tiny_flatten", "-o", str(out)])
    assert rc == ExitCode.OK and out.is_file()


def test_library_save_never_writes_over_its_source(tiny):
    import converter
    from converter.errors import OutputExistsError

    before = tiny["src"].read_bytes()
    result = converter.convert(tiny["src"], mapping=tiny["table"])
    with pytest.raises(OutputExistsError, match="is the input file"):
        result.save(tiny["src"], force=True)
    assert tiny["src"].read_bytes() == before
