"""Builds the 2 GiB+ custom Keras model of issue 12 (benchmark fixture, not a test): a functional
model of Dense layers (ReLU) with a BatchNorm after every few, the layout of
``benchmarks/big_dense.py``, random weights (seeded; biases, gammas, betas and BN statistics
randomized too), saved as ``.keras``. Runs TensorFlow in its own process:

    python benchmarks/big_fixture.py --out /work/bench-fixtures/big-dense [--tiny]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_dense import BN_EVERY, DEPTH, TINY_DEPTH, TINY_WIDTH, WIDTH  # noqa: E402 (torch first)


def build(width: int, depth: int, bn_every: int, seed: int):
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inp = keras.Input((width,), name="x")
    h = inp
    for i in range(depth):
        h = layers.Dense(width, activation="relu", name=f"dense_{i}")(h)
        if (i + 1) % bn_every == 0:
            h = layers.BatchNormalization(name=f"bn_{i}")(h)
    return keras.Model(inp, h, name="big_dense")


def randomize(model, seed: int) -> None:
    """Biases, gammas, betas and BN statistics away from their trivial initial values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        if layer.__class__.__name__ == "Dense":
            weights[1] = rng.normal(0, 0.1, weights[1].shape).astype(np.float32)
        else:  # gamma, beta, moving mean, moving variance
            n = weights[0].shape
            weights = [
                rng.uniform(0.5, 1.5, n),
                rng.normal(0, 0.2, n),
                rng.normal(0, 0.2, n),
                rng.uniform(0.5, 1.5, n),
            ]
        layer.set_weights(weights)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder; writes big.keras there")
    ap.add_argument("--tiny", action="store_true", help="width 64, depth 6 (checks the benchmark)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    width, depth = (TINY_WIDTH, TINY_DEPTH) if args.tiny else (WIDTH, DEPTH)
    model = build(width, depth, BN_EVERY, args.seed)
    randomize(model, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "big.partial.keras"
    model.save(tmp)
    tmp.replace(args.out / "big.keras")
    print(f"{args.out / 'big.keras'}: {model.count_params() * 4 / 2**30:.2f} GiB of float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
