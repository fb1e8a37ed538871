"""BN momentum conventions (see ``docs/batchnorm.md``)::

Keras/TF:  moving  = m * moving  + (1 - m) * batch      (default m = 0.99)
PyTorch:   running = (1 - p) * running + p * batch      (default p = 0.1)
p = 1 - m
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConverterError


def _check_momentum(value: Any, convention: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(float(value))
    ):
        raise ConverterError(f"{convention} momentum must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConverterError(f"{convention} momentum must be in (0, 1) (exclusive), got {value!r}")
    return value


def _complement(value: float) -> float:
    # 1 - 0.99 is 0.010000000000000009 in binary floating point; keep 12 significant digits so the
    # value reads as the 0.01 everyone means (a relative change below 1e-12).
    return float(f"{1.0 - value:.12g}")


def momentum_from_keras(m: float) -> float:
    """PyTorch BN momentum for a Keras/TF momentum ``m``: ``1 - m`` (Keras 0.99 -> PyTorch 0.01).

    Raises ConverterError unless ``0 < m < 1``.
    """
    return _complement(_check_momentum(m, "Keras"))


def momentum_to_keras(p: float) -> float:
    """Keras/TF BN momentum for a PyTorch momentum ``p``: ``1 - p`` (PyTorch 0.1 -> Keras 0.9).

    Raises ConverterError unless ``0 < p < 1`` (PyTorch's ``momentum=None``, a cumulative average,
    has no Keras equivalent).
    """
    if p is None:
        raise ConverterError(
            "PyTorch momentum=None (cumulative average) has no Keras equivalent; pick a momentum "
            "in (0, 1)"
        )
    return _complement(_check_momentum(p, "PyTorch"))


from_keras = momentum_from_keras
to_keras = momentum_to_keras
