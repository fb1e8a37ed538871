"""Test helpers for users' own regression suites."""

from __future__ import annotations

import os
from typing import Any


def assert_equivalent(
    src: str | os.PathLike | None, converted: str | os.PathLike, **kwargs: Any
) -> Any:
    """Assert the converted checkpoint computes what its Keras source computes, layer by layer.

    Keyword arguments go to :func:`converter.verify` (``inputs``, ``rtol``, ``train_step``,
    ``against`` for a recorded reference, ...). Returns the report; raises AssertionError naming the
    first divergent layer pair otherwise.
    """
    from .verification import verify

    report = verify(src, converted, **kwargs)
    if not report.passed:
        f = report.first_divergent or {}
        out = report.output
        out_err = f"{out['rel']:.3g}" if out.get("rel") is not None else out.get("reason", "n/a")
        raise AssertionError(
            f"{converted} differs from {src or kwargs.get('against')}: first divergent layer"
            f" {f.get('source_layer')} -> {f.get('target_module')} (rel error"
            f" {f.get('rel', float('nan')):.3g}, tolerance {report.rtol:g}); output rel error"
            f" {out_err}"
        )
    return report
