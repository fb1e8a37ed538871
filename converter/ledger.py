"""The target state dict while a conversion fills it: every tensor placed once, at the target's
shape and dtype, with who filled it; every problem collected, so one error lists them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import numpy as np

from .errors import InvalidTensorError, MappingError, ShapeMismatchError

MAX_LISTED = 12
SPILL_BYTES = 64 << 10  # with a sink, tensors at least this large go to it as they are placed


def listing(items: list[str]) -> str:
    """``a, b, c, ... and N more``: at most ``MAX_LISTED`` items of a long list in a message."""
    shown = ", ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f", ... and {more} more" if more > 0 else "")


def check_finite(array: np.ndarray, what: str) -> None:
    """Refuse NaN/inf in a float tensor; ``what`` names it in the message. (A finite sum proves
    every element finite, NaN and inf propagating through it, without a mask the tensor's size;
    an overflowing sum of finite values falls back to the element-wise test.)"""
    if array.dtype.kind == "f" and not np.isfinite(array.sum()) and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise InvalidTensorError(
            f"{what} holds {bad} NaN/inf values; the checkpoint is damaged or diverged"
        )


class Sink(Protocol):
    """Where a streamed conversion puts large tensors as they are placed (a safetensors file being
    written: converter.formats.safetensors_file.SafetensorsStream)."""

    def put(self, key: str, array: np.ndarray) -> None: ...

    def get(self, key: str) -> np.ndarray: ...


@dataclass(frozen=True)
class Spilled:
    """A placed tensor that went to the sink: only its shape and dtype stay in memory."""

    shape: tuple[int, ...]
    dtype: np.dtype


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

    def __init__(self, target_manifest: dict[str, Any], sink: Sink | None = None) -> None:
        self.shapes = {t["key"]: tuple(t["shape"]) for t in target_manifest["tensors"]}
        self.dtypes = {t["key"]: t["dtype"] for t in target_manifest["tensors"]}
        self.tensors: dict[str, np.ndarray | Spilled] = {}
        self.sink = sink
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
        self.filled_by[key] = source_layer
        self._keep(key, array.astype(self.dtypes[key], copy=False))
        return True

    def _keep(self, key: str, array: np.ndarray) -> None:
        """Hold a placed tensor, or (streaming, large, checked now) hand it to the sink."""
        if self.sink is None or array.nbytes < SPILL_BYTES:
            self.tensors[key] = array
            return
        check_finite(array, f"target tensor {key!r} (from {self.filled_by.get(key)})")
        self.sink.put(key, array)
        self.tensors[key] = Spilled(tuple(array.shape), array.dtype)

    def array(self, key: str) -> np.ndarray:
        """A placed tensor's values (read back from the sink when it went there)."""
        held = self.tensors[key]
        return self.sink.get(key) if isinstance(held, Spilled) else held

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
            current = self.array(key)
            difference = current.astype(np.float64) - array.astype(np.float64)
            self._keep(key, difference.astype(current.dtype))

    def place_fresh(self, tensors: dict[str, np.ndarray], filled_by: str) -> None:
        """Put tensors made for the target itself (a fresh classifier head), checked and cast as
        any other."""
        for key, array in tensors.items():
            self.place(key, array, filled_by, "the target's own initialisation")

    def finish(self, label: str, table_id: str) -> dict[str, np.ndarray | Spilled]:
        """The state dict in the target's key order (a ``Spilled`` where the tensor went to the
        sink), or one error listing every problem (``label``: ``source -> target`` for the
        message)."""
        if self.problems.shape:  # the root cause: report it before the unfilled keys it leaves
            raise ShapeMismatchError(
                f"{label}: shape mismatch: {listing(self.problems.shape)}; "
                "is the source the same architecture/width as the target?"
            )
        messages = self._mapping_messages()
        if messages:
            raise MappingError(f"{label} (table {table_id}): " + "; ".join(messages))
        for key, array in self.tensors.items():
            if not isinstance(array, Spilled):  # spilled ones were checked on their way out
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
