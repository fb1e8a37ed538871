"""The tile of transforms.TRANSPOSE_TILE (HWIO -> OIHW, Dense (in, out) -> (out, in)): each kernel
shape of a ResNet/EfficientNet, numpy's whole-view strided copy against tiles of several
sizes, best of 7, in one process. Not a test; run it on a quiet machine:

    python benchmarks/transpose_tiles.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from converter import transforms  # noqa: E402

SHAPES = [(3, 3, 512, 512), (1, 1, 1024, 2048), (1, 1, 2048, 512), (3, 3, 256, 256),
          (7, 7, 3, 64), (1, 1, 384, 2304), (2048, 1000)]
TILES = [(64, 64), (128, 32), (256, 32), (256, 16), (128, 128)]


def best_ms(f, x, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        f(x)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def whole_view(x: np.ndarray) -> np.ndarray:
    axes = (3, 2, 0, 1) if x.ndim == 4 else (1, 0)
    return np.ascontiguousarray(np.transpose(x, axes))


def main() -> None:
    rng = np.random.default_rng(0)
    permute = {4: transforms.Permute((3, 2, 0, 1)), 2: transforms.Permute((1, 0))}
    print("shape | whole view | " + " | ".join(f"tiles {o}x{i}" for o, i in TILES))
    for shape in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        assert np.array_equal(permute[x.ndim](x), whole_view(x))
        row = [best_ms(whole_view, x)]
        for o, i in TILES:
            transforms.TRANSPOSE_TILE = (o, i)
            row.append(best_ms(permute[x.ndim], x))
        print(f"{shape} | " + " | ".join(f"{ms:.2f} ms" for ms in row))


if __name__ == "__main__":
    main()
