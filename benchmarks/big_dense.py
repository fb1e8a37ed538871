"""The user's PyTorch module for the 2 GiB+ custom Keras model of ``benchmarks/big_fixture.py``
(benchmark only): what a user hands to ``ckptport convert big.keras --to big_dense.py:factory``.

Dense layers of WIDTH x WIDTH with ReLU, a BatchNorm after every BN_EVERY-th one; DEPTH = 34 at
width 4096 is 2.13 GiB of float32 (34 x 64 MiB kernels). ``tiny`` is the same layout at width 64,
to check the benchmark itself in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

WIDTH, DEPTH, BN_EVERY = 4096, 34, 4
TINY_WIDTH, TINY_DEPTH = 64, 6


class BigDense(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = DEPTH, bn_every: int = BN_EVERY):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(depth):
            blocks += [nn.Linear(width, width), nn.ReLU()]
            if (i + 1) % bn_every == 0:
                blocks.append(nn.BatchNorm1d(width))
        self.body = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def factory() -> BigDense:
    return BigDense()


def tiny() -> BigDense:
    return BigDense(TINY_WIDTH, TINY_DEPTH)
