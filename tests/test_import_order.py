"""The import-order rule in the CLI's processes: a conversion onto the user's own module imports
torch alone (torchvision is ~170 MiB of peak RSS it does not use), which must leave Keras usable
afterwards; and the console script's exit without libtorch's native teardown keeps the exit code,
every atexit handler and buffered output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import TINY_TARGET, make_tiny_keras, tiny_table

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("order")
    table = d / "tiny.toml"
    table.write_text(tiny_table())
    return {"src": make_tiny_keras(d / "tiny.keras"), "table": table, "dir": d}


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=600)


def test_user_module_conversion_imports_torch_alone_and_keras_builds_after(tiny):
    out = tiny["dir"] / "a.safetensors"
    proc = python(f"""
        import sys
        from converter.cli import main
        rc = main(["convert", {str(tiny['src'])!r}, "--mapping", {str(tiny['table'])!r},
                   "--to", {TINY_TARGET!r}, "-o", {str(out)!r}, "--no-verify"])
        assert rc == 0, rc
        assert "torch" in sys.modules, "the target was not built: this test checks nothing"
        print("TORCHVISION", "torchvision" in sys.modules)
        import keras  # TensorFlow after torch alone: a Keras build must not crash
        model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                                  keras.layers.BatchNormalization()])
        print("KERAS", model.count_params())
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCHVISION False" in proc.stdout
    assert "KERAS 128" in proc.stdout


def test_a_user_module_after_tensorflow_is_still_refused_cleanly():
    """Importing torch alone for a user's module must not bypass the import-order guard: with
    TensorFlow loaded first and torchvision not, building the module is refused in one line (as
    before), not attempted."""
    proc = python(f"""
        import tensorflow
        from converter.errors import ConverterError
        from converter.model import build_target
        try:
            build_target({TINY_TARGET!r})
        except ConverterError as exc:
            print("REFUSED", exc)
        """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("REFUSED") and "before tensorflow" in proc.stdout, proc.stdout


def test_exit_without_native_teardown_keeps_code_handlers_and_output():
    proc = python("""
        import atexit, sys
        from converter.cli.common import skip_native_teardown
        leave = skip_native_teardown()
        import torch
        atexit.register(lambda: sys.stdout.write(" handler"))
        sys.stdout.write("buffered")  # no newline, a pipe: only a flush writes it
        leave(3)
        """)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered handler"


def test_console_script_output_and_exit_code(tiny):
    """Through `python -m converter` (the console script's path): --json comes out whole after a
    conversion that imported torch, and a refusal still exits 2."""
    out = tiny["dir"] / "b.safetensors"
    args = ["convert", str(tiny["src"]), "--mapping", str(tiny["table"]), "--to", TINY_TARGET]
    cmd = [sys.executable, "-m", "converter"]
    proc = subprocess.run([*cmd, *args, "-o", str(out), "--no-verify", "--json"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["output"] == str(out)
    again = subprocess.run([*cmd, *args, "-o", str(out), "--no-verify"], capture_output=True,
                           text=True, env=ENV)
    assert again.returncode == 2 and "--force" in again.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_convert_process_keeps_freed_buffers_for_reuse():
    """glibc accepts both settings (a rejected value, e.g. a threshold above its maximum, would
    make mallopt return 0 and the conversion fault every layer's pages in again)."""
    proc = python("""
        import platform
        from converter.allocator import reuse_freed_buffers
        print(platform.libc_ver()[0], reuse_freed_buffers())
        """)
    assert proc.returncode == 0, proc.stderr
    libc, applied = proc.stdout.split()
    assert applied == ("True" if libc == "glibc" else "False")
