"""Helpers shared by the tests, imported as ``from helpers import ...`` (pytest puts tests/ on the
path: ``pythonpath`` in pyproject.toml). Fixtures live in conftest.py, which imports torchvision
before any test module can import Keras.

Keras models are built in subprocesses (fixtures/keras_models.py) and cached per generator version
in $CKPTPORT_TEST_CACHE (FileLock-protected, shared between checkouts), so test processes never
import TensorFlow to get a fixture."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "fixtures" / "keras_models.py"
CACHE = Path(os.environ.get("CKPTPORT_TEST_CACHE", ROOT / ".pytest_cache" / "keras-fixtures"))
# Every source format the fixture generator writes (one fixture per list: the cache key has it)
ALL_FORMATS = [
    "keras",
    "weights.h5",
    "h5",
    "h5-weights",
    "tf-checkpoint",
    "tf-names",
    "tf-layer-with-weights",
    "savedmodel",
]


def _gen_version(generator: Path = GENERATOR) -> str:
    extra = generator.read_bytes() if generator != GENERATOR else b""
    return hashlib.sha256(GENERATOR.read_bytes() + extra).hexdigest()[:12]


def keras_build_args(manifest_id: str) -> tuple[str, dict, dict]:
    """``keras:MobileNetV3Small(alpha=0.75)`` -> ("MobileNetV3Small", {"alpha": 0.75}, the
    table's [input])."""
    from converter.manifest import load_manifest
    from converter.tables import builtin_tables

    build = load_manifest(manifest_id)["build"]
    dropped = ("weights", "input_shape", "classifier_activation", "classes")
    kwargs = {k: v for k, v in build.get("kwargs", {}).items() if k not in dropped}
    if kwargs.get("include_top", True):  # the default; include_top=False is a build of its own
        kwargs.pop("include_top", None)
    table = next(t for t in builtin_tables() if any(v.source == manifest_id for v in t.variants))
    return build["fn"], kwargs, table.input


def headless_build(manifest_id: str | None) -> bool:
    """Whether the source manifest is an include_top=False build (ConvNeXt's own manifests)."""
    from converter.manifest import load_manifest

    if manifest_id is None:
        return False
    return load_manifest(manifest_id)["build"].get("kwargs", {}).get("include_top", True) is False


def make_keras_fixture(
    fn: str,
    kwargs: dict,
    input_spec: dict,
    formats: list[str],
    seed: int = 0,
    generator: Path = GENERATOR,
) -> dict:
    """Build (or reuse) a randomized Keras model saved in ``formats``; returns files.json plus the
    reference input and logits. ``input_spec`` is the table's [input] (size, value range);
    ``generator``: a script taking keras_models.py's arguments (fixtures/keras_offset.py)."""
    size, (lo, hi) = input_spec["size"], input_spec["range"]
    spec = [fn, kwargs, sorted(formats), size, lo, hi, seed, _gen_version(generator)]
    if generator != GENERATOR:
        spec.append(generator.name)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    cmd = ["--build", fn, "--size", str(size), "--seed", str(seed), "--formats", ",".join(formats)]
    cmd += [f"--range={lo},{hi}", *(f"--kw={k}={json.dumps(v)}" for k, v in kwargs.items())]
    return cached_build(CACHE / f"{fn}-{key}", generator, cmd)


def cached_build(out: Path, generator: Path, args: list[str]) -> dict:
    """Run ``generator --out OUT ARGS`` once per cache key (file-locked across test workers and
    worktrees); returns its files.json plus the reference input and logits."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "files.json").exists():
            cmd = [sys.executable, str(generator), "--out", str(out), *args]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"fixture generation failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
                )
    info = json.loads((out / "files.json").read_text())
    ref = np.load(out / "reference.npz")
    info["x"], info["logits"], info["dir"] = ref["x"], ref["logits"], out
    return info


def torch_logits(
    model, x_nhwc: np.ndarray, preprocessing: dict | None = None, dtype=None
) -> np.ndarray:
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


def run_cli(args: Sequence[object], capsys) -> tuple[int, str, str]:
    """``ckptport ARGS`` in-process: (exit code, stdout, stderr)."""
    from converter.cli import main

    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_clean_error(rc: int, err: str, *needles: str, out: Path | None = None) -> None:
    """Exit 2 with exactly one ``error: ...`` line holding every needle, no traceback; with
    ``out``: that output does not exist and no partial file was left beside it."""
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*")), "a partial file was left behind"


def convert_streamed_and_held(src: Path, out_dir: Path, **options):
    """Convert ``src`` three ways: streamed into a file (``convert_file``, the CLI's path), with
    buffered and with direct output I/O, and held in memory then saved (``convert(...).save``);
    the three files must be byte-identical. Returns the in-memory result and the streamed
    file."""
    import converter

    _, streamed = converter.convert_file(src, out_dir / "streamed.safetensors", **options)
    direct = out_dir / "direct.safetensors"
    converter.convert_file(src, direct, output_io="direct", **options)
    result = converter.convert(src, **options)
    held = result.save(out_dir / "held.safetensors")
    assert streamed.read_bytes() == held.read_bytes(), f"{src}: streamed output differs"
    assert direct.read_bytes() == held.read_bytes(), f"{src}: direct output differs"
    return result, streamed


def sha(p: Path) -> str:
    """SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


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
    cmd = ["--build", fn, "--size", str(size), "--seed", str(seed), "--formats", ",".join(formats)]
    cmd += ["--wrap", wrap, "--classes", str(classes)]
    cmd += [f"--kw={k}={json.dumps(v)}" for k, v in kwargs.items()]
    return cached_build(CACHE / f"{fn}-{wrap}-{key}", WRAPPED_GENERATOR, cmd)


# The tiny Flatten twin (fixtures/keras_tiny.py, fixtures/tiny_models.py:tiny_flatten) and its table.
TINY_TARGET = f"{ROOT / 'fixtures' / 'tiny_models.py'}:tiny_flatten"


def tiny_table(fc_transform: str = "dense_after_flatten") -> str:
    """The mapping table of the tiny twin; ``fc_transform="dense"`` plants the Flatten-order bug."""
    rules = [
        ("conv", "conv2d", ""),
        ("bn", "batch_norm", ""),
        ("fc", fc_transform, "args = { hwc = [8, 8, 4] }\n"),
    ]
    text = (
        f'[table]\nid = "tiny-flatten"\nversion = 1\n[input]\nsize = 8\nrange = [0.0, 255.0]\n'
        f'[[variants]]\ntarget = "{TINY_TARGET}"\n'
    )
    for name, transform, extra in rules:
        text += (
            f"[[rules]]\nsource = '{name}'\ntarget = '{name}'\ntransform = '{transform}'\n{extra}"
        )
    return text


def make_tiny_keras(path: Path) -> Path:
    """The randomized Keras twin saved as ``path`` (.keras), built in its own process."""
    subprocess.run(
        [sys.executable, str(ROOT / "fixtures" / "keras_tiny.py"), str(path)],
        check=True,
        capture_output=True,
    )
    return path
