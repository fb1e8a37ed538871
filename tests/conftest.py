"""Shared fixtures; helper functions are in helpers.py.

torchvision is imported here, first: imported after tensorflow/keras it makes the next Keras model
build segfault on this stack, and pytest imports conftest.py before any test module. Keras models
are built in subprocesses (helpers.make_keras_fixture), so test processes never import TF to get
one."""

from __future__ import annotations

import sys

if "keras" in sys.modules or "tensorflow" in sys.modules:  # a plugin got there first
    raise RuntimeError("tensorflow/keras imported before conftest: torchvision must come first")

import torchvision  # noqa: F401  (must precede any keras import; see CONTRIBUTING.md)
import pytest

from helpers import run_cli


@pytest.fixture
def cli(capsys):
    """``cli("convert", src, "-o", out)`` -> (exit code, stdout, stderr), in-process."""
    return lambda *args: run_cli(args, capsys)
