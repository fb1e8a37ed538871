"""Measured logit error of every table variant (not a test): the README support matrix quotes it.

    python benchmarks/logit_errors.py [--only TABLE_ID ...] [--skip-slow]

For each variant: build the seeded random-weight Keras fixture (.keras, the table's input size; the
test suite's cache is reused), convert it, run the converted PyTorch model in float32 and in float64
on the same input, and record

- ``rel_err``: max |torch float32 - Keras| / std(Keras logits), the number the README quotes;
- ``float_noise``: max |torch float32 - torch float64| / std, what float32 rounding alone gives on
  this network (a conversion cannot be judged below it).

Results are merged into docs/support-errors.json (per table id, per variant).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torchvision  # noqa: E402,F401  (before anything imports Keras)

OUT = ROOT / "docs" / "support-errors.json"
SLOW = ("EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "ResNet152", "VGG19", "EfficientNetV2M",
        "EfficientNetV2L", "ConvNeXtLarge", "ConvNeXtXLarge", "DenseNet201")


def measure(table, variant) -> dict:
    import torch

    import converter
    from converter.model import load_model
    from helpers import keras_build_args, make_keras_fixture, rel_err, torch_logits

    fn, kwargs, inp = keras_build_args(variant.source)
    fx = make_keras_fixture(fn, kwargs, inp, ["keras"])
    result = converter.convert(fx["files"]["keras"], to=variant.target)
    out = Path(fx["dir"]) / f"bench-{variant.target.replace(':', '_')}.safetensors"
    result.save(out, force=True)
    model = load_model(out)
    y32 = torch_logits(model, fx["x"], result.preprocessing)
    y64 = torch_logits(model.double(), fx["x"], result.preprocessing, dtype=torch.float64)
    return {"variant": f"{variant.source} -> {variant.target}", "rel_err": rel_err(y32, fx["logits"]),
            "float_noise": rel_err(y32, y64), "input_size": int(fx["x"].shape[1])}


def main(argv: list[str] | None = None) -> int:
    from converter.tables import builtin_tables

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="table ids")
    ap.add_argument("--skip-slow", action="store_true", help="skip the biggest variants")
    args = ap.parse_args(argv)
    data = json.loads(OUT.read_text()) if OUT.is_file() else {"tables": {}}
    for table in builtin_tables():
        if args.only and table.id not in args.only:
            continue
        for variant in table.variants:
            if args.skip_slow and any(variant.source == f"keras:{s}" for s in SLOW):
                continue
            t0 = time.perf_counter()
            row = measure(table, variant)
            data["tables"].setdefault(table.id, {})[row["variant"]] = row
            print(f"{row['variant']}: rel_err {row['rel_err']:.2e}, float32 noise {row['float_noise']:.2e} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
