"""Float32 noise of converted random-weight fixtures: Keras vs PyTorch float32, and PyTorch float32
vs float64 on the same converted weights (the target framework's own rounding noise).

    CKPTPORT_TEST_CACHE=/work/fixture-cache python benchmarks/float_noise.py \
        keras:EfficientNetV2B0 [keras:MobileNetV2 ...] [--size N]

Fixtures are the test suite's (tests/conftest.py: seeded, cached, built in a Keras subprocess) at
the table's [input] size unless --size is given. Errors are max |difference| over the batch
relative to the reference logits' standard deviation, as in tests/test_convert_e2e.py.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torchvision  # noqa: E402,F401  (torch side before anything that could import Keras)

from conftest import keras_build_args, make_keras_fixture, rel_err, torch_logits  # noqa: E402


def measure(source_id: str, size: int | None) -> dict:
    import torch

    import converter
    from converter.model import load_model

    fn, kwargs, inp = keras_build_args(source_id)
    if size:
        inp = {**inp, "size": size}
    fx = make_keras_fixture(fn, kwargs, inp, ["keras"])
    result = converter.convert(fx["files"]["keras"])
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(result.save(Path(tmp) / "m.safetensors"))
    y32 = torch_logits(model, fx["x"], result.preprocessing)
    y64 = torch_logits(model.double(), fx["x"], result.preprocessing, dtype=torch.float64)
    return {
        "size": inp["size"],
        "keras_vs_torch32": rel_err(y32, fx["logits"]),
        "torch32_vs_torch64": rel_err(y32, y64),
        "keras_vs_torch64": rel_err(y64, fx["logits"]),
        "logits_std": float(fx["logits"].std()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+", help="source manifest ids, e.g. keras:EfficientNetV2B0")
    ap.add_argument("--size", type=int, help="input size (default: the table's [input] size)")
    a = ap.parse_args(argv)
    print("| model | px | Keras vs PyTorch float32 | PyTorch float32 vs float64 "
          "| Keras vs PyTorch float64 |")
    print("|---|---|---|---|---|")
    for sid in a.sources:
        r = measure(sid, a.size)
        row = [sid, r["size"], *(f"{r[k]:.1e}" for k in ("keras_vs_torch32", "torch32_vs_torch64",
                                                         "keras_vs_torch64"))]
        print("| " + " | ".join(map(str, row)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
