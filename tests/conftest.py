"""Shared fixtures. torchvision is imported first: imported after tensorflow/keras it makes the next
Keras model build segfault on this stack. Keras models are built in subprocesses
(fixtures/keras_models.py) and cached per generator version, so test processes never import TF."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torchvision  # noqa: F401  (must precede any keras import; see DEVELOPERS.md)
import numpy as np
import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "fixtures" / "keras_models.py"
CACHE = Path(os.environ.get("CKPTPORT_TEST_CACHE", ROOT / ".pytest_cache" / "keras-fixtures"))


def _gen_version() -> str:
    return hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12]


def keras_build_args(manifest_id: str) -> tuple[str, dict, dict]:
    """``keras:MobileNetV3Small(alpha=0.75)`` -> ("MobileNetV3Small", {"alpha": 0.75}, table [input])."""
    from converter.manifest import load_manifest
    from converter.tables import builtin_tables

    build = load_manifest(manifest_id)["build"]
    kwargs = {k: v for k, v in build.get("kwargs", {}).items()
              if k not in ("weights", "input_shape", "classifier_activation", "include_top", "classes")}
    table = next(t for t in builtin_tables() if any(v.source == manifest_id for v in t.variants))
    return build["fn"], kwargs, table.input


def make_keras_fixture(fn: str, kwargs: dict, input_spec: dict, formats: list[str], seed: int = 0) -> dict:
    """Build (or reuse) a randomized Keras model saved in ``formats``; returns files.json + reference.
    ``input_spec`` is the table's [input] (size, value range)."""
    size, (lo, hi) = input_spec["size"], input_spec["range"]
    key = hashlib.sha256(json.dumps([fn, kwargs, sorted(formats), size, lo, hi, seed, _gen_version()],
                                    sort_keys=True).encode()).hexdigest()[:16]
    out = CACHE / f"{fn}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "files.json").exists():
            cmd = [sys.executable, str(GENERATOR), "--build", fn, "--out", str(out), "--size", str(size),
                   "--seed", str(seed), "--formats", ",".join(formats), f"--range={lo},{hi}"]
            cmd += [f"--kw={k}={json.dumps(v)}" for k, v in kwargs.items()]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"fixture generation failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    info = json.loads((out / "files.json").read_text())
    ref = np.load(out / "reference.npz")
    info["x"], info["logits"], info["dir"] = ref["x"], ref["logits"], out
    return info


@pytest.fixture(scope="session")
def keras_fixture():
    return make_keras_fixture


def torch_logits(model, x_nhwc: np.ndarray, preprocessing: dict | None = None, dtype=None) -> np.ndarray:
    """Run a converted model on the Keras input (NHWC), applying the recorded preprocessing."""
    import torch

    x = x_nhwc.astype(np.float64)
    if preprocessing and preprocessing.get("steps"):
        x = x * np.asarray(preprocessing["scale"]) + np.asarray(preprocessing["offset"])
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dtype or torch.float32)
        return model(xt).numpy()


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    """Max abs error relative to the logits' scale (their standard deviation)."""
    return float(np.abs(y - ref).max() / ref.std())


WRAPPED_GENERATOR = ROOT / "fixtures" / "keras_wrapped.py"
WRAPPED_FORMATS = ["keras", "weights.h5", "h5", "tf-checkpoint", "savedmodel"]


def make_wrapped_fixture(
    fn: str,
    kwargs: dict,
    wrap: str = "none",
    classes: int = 5,
    size: int = 64,
    formats: list[str] | None = None,
    seed: int = 0,
) -> dict:
    """Like make_keras_fixture, for re-headed or nested applications (fixtures/keras_wrapped.py);
    input range [0, 255] (the applications' own preprocessing does the rest)."""
    formats = formats or WRAPPED_FORMATS
    version = hashlib.sha256(WRAPPED_GENERATOR.read_bytes() + GENERATOR.read_bytes()).hexdigest()[
        :12
    ]
    key = hashlib.sha256(
        json.dumps(
            [fn, kwargs, wrap, classes, sorted(formats), size, seed, version], sort_keys=True
        ).encode()
    ).hexdigest()[:16]
    out = CACHE / f"{fn}-{wrap}-{key}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "files.json").exists():
            cmd = [
                sys.executable,
                str(WRAPPED_GENERATOR),
                "--build",
                fn,
                "--out",
                str(out),
                "--size",
                str(size),
                "--seed",
                str(seed),
                "--formats",
                ",".join(formats),
                "--wrap",
                wrap,
                "--classes",
                str(classes),
            ]
            cmd += [f"--kw={k}={json.dumps(v)}" for k, v in kwargs.items()]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"fixture generation failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
                )
    info = json.loads((out / "files.json").read_text())
    ref = np.load(out / "reference.npz")
    info["x"], info["logits"], info["dir"] = ref["x"], ref["logits"], out
    return info
