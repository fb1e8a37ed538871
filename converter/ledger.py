"""The target state dict while a conversion fills it: every tensor placed once, at the target's
shape and dtype, with who filled it; every problem collected, so one error lists them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .errors import InvalidTensorError, MappingError, ShapeMismatchError

MAX_LISTED = 12


def listing(items: list[str]) -> str:
    """``a, b, c, ... and N more``: at most ``MAX_LISTED`` items of a long list in a message."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN/inf in a float tensor; ``what`` names it in the message."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise InvalidTensorError(
            f"{what} holds {bad} NaN/inf values; the checkpoint is damaged or diverged"
        )


@dataclass
class Problems:
    """What went wrong while filling the target, by kind, in the order it was found."""

    unmapped: list[str] = field(default_factory=list)  # source tensors no rule maps
    unexpected: list[str] = field(default_factory=list)  # keys the target does not have
    duplicate: list[str] = field(default_factory=list)  # keys filled twice
    shape: list[str] = field(default_factory=list)  # tensors of the wrong shape


class TargetLedger:
    """The target's keys, shapes and dtypes (from its manifest), the tensors placed so far and who
    placed each; ``finish`` raises one error listing every problem, or returns the state dict."""

    def __init__(self, target_manifest: dict[str, Any]) -> None:
        self.shapes = {t["key"]: tuple(t["shape"]) for t in target_manifest["tensors"]}
        self.dtypes = {t["key"]: t["dtype"] for t in target_manifest["tensors"]}
        self.tensors: dict[str, np.ndarray] = {}
        self.filled_by: dict[str, str] = {}
        self.problems = Problems()

    def place(self, key: str, array: np.ndarray, source_layer: str, how: str) -> bool:
        """Put ``array`` (from ``source_layer``, made by ``how``) at ``key`` in the target's dtype;
        False (and a problem recorded) when the key is unknown, already filled or the shape differs.
        """
        if key not in self.shapes:
            self.problems.unexpected.append(f"{key} (from {source_layer})")
            return False
        if key in self.tensors:
            self.problems.duplicate.append(f"{key} (from {self.filled_by[key]} and {source_layer})")
            return False
        if tuple(array.shape) != self.shapes[key]:
            self.problems.shape.append(
                f"{key}: {source_layer} gives {tuple(array.shape)} after {how}, "
                f"target expects {self.shapes[key]}"
            )
            return False
        self.tensors[key] = array.astype(self.dtypes[key], copy=False)
        self.filled_by[key] = source_layer
        return True

    def unmapped(self, source_tensors: Iterable[str]) -> None:
        """Record source tensors (``layer/variable``) that no rule consumed."""
        self.problems.unmapped += list(source_tensors)

    def apply_adjustments(self, adjustments: list[tuple[str, str, np.ndarray, str]]) -> None:
        """Apply ``(key, "sub", array, why)`` adjustments (a conv bias folded into a BN running
        mean: subtract ``array``) to tensors already placed, in float64; a key not placed is a
        problem."""
        for key, _op, array, why in adjustments:
            if key not in self.tensors:
                self.problems.unexpected.append(f"{key} (bias fold target: {why})")
                continue
            current = self.tensors[key]
            difference = current.astype(np.float64) - array.astype(np.float64)
            self.tensors[key] = difference.astype(current.dtype)

    def place_fresh(self, tensors: dict[str, np.ndarray], filled_by: str) -> None:
        """Put tensors made for the target itself (a fresh classifier head) as they are."""
        self.tensors.update(tensors)
        for key in tensors:
            self.filled_by[key] = filled_by

    def finish(self, label: str, table_id: str) -> dict[str, np.ndarray]:
        """The state dict in the target's key order, or one error listing every problem
        (``label``: ``source -> target`` for the message)."""
        if self.problems.shape:  # the root cause: report it before the unfilled keys it leaves
            raise ShapeMismatchError(
                f"{label}: shape mismatch: {listing(self.problems.shape)}; "
                "is the source the same architecture/width as the target?"
            )
        messages = self._mapping_messages()
        if messages:
            raise MappingError(f"{label} (table {table_id}): " + "; ".join(messages))
        for key, array in self.tensors.items():
            check_finite(array, f"target tensor {key!r} (from {self.filled_by.get(key)})")
        return {key: self.tensors[key] for key in self.shapes}

    def _mapping_messages(self) -> list[str]:
        problems = self.problems
        missing = [key for key in self.shapes if key not in self.tensors]
        messages = []
        if problems.unmapped:
            messages.append(
                f"{len(problems.unmapped)} source tensors mapped by no rule: "
                f"{listing(problems.unmapped)}"
            )
        if missing:
            messages.append(f"{len(missing)} target tensors left unfilled: {listing(missing)}")
        if problems.unexpected:
            messages.append(
                f"rules produce keys the target does not have: {listing(problems.unexpected)}"
            )
        if problems.duplicate:
            messages.append(f"target keys filled twice: {listing(problems.duplicate)}")
        return messages
