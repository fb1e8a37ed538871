"""Per-Keras-class emitters: what each layer becomes in the generated module.

An emitter is a small named object registered under the Keras class names it handles. Given a
:class:`Site` (one call of the layer: config, input ranks, weight shapes), it returns a
:class:`Piece`: the constructor written in ``__init__`` (or none), the expression written in
``forward``, the output's rank and layout, the weight transform (a name in
``converter.transforms.TRANSFORMS``) and what the file needs besides (helper functions, classes).

Layouts: PyTorch tensors of rank >= 3 are channels-first (``CF``) where a conv, pool or BatchNorm
wants them, channels-last (``CL``, Keras' own order) where a Dense, LayerNorm, Reshape or Flatten
wants them; the module writer inserts the permutes between the two. Rank-2 tensors have no layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..registry import Registry
from ..keras_graph import Call

CF, CL, ANY = "channels_first", "channels_last", "any"


@dataclass
class Site:
    """One call of a Keras layer, as an emitter sees it."""

    call: Call
    attr: str  # the module attribute: the Keras layer name made an identifier
    ranks: list[int]  # Keras ranks (batch included) of the tensor inputs
    layouts: list[str]  # layouts of the tensor inputs as they arrive
    weights: dict[str, tuple[int, ...]]  # variable -> shape, from the file

    @property
    def config(self) -> dict[str, Any]:
        return self.call.config

    @property
    def rank(self) -> int:
        return self.ranks[0] if self.ranks else 2

    @property
    def spatial(self) -> int:
        return max(self.rank - 2, 1)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key, default)
        return default if value is None else value


@dataclass
class Piece:
    """What one Keras call becomes. ``expr`` is a format string: ``{x}`` the first input, ``{xs}``
    all inputs (comma-separated), ``{m}`` the module (``self.<attr>``)."""

    init: str | None
    expr: str
    rank: int
    layout: str
    transform: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    helpers: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    tap: bool = True  # the module's output equals the Keras layer's (for verification)
    after: list[str] = field(default_factory=list)  # statements after the constructor


class Emitter:
    """Turns one Keras call into a :class:`Piece`; ``wants`` is the layout it needs its tensor
    inputs in (``ANY``: the first input's, the others made to match)."""

    name = "emitter"
    wants = ANY

    def emit(self, site: Site) -> Piece:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


EMITTERS: Registry[Emitter] = Registry("Keras layer class with a PyTorch port")


def emitter(*classes: str):
    """Class decorator: register one instance under each Keras class name."""

    def deco(cls: type[Emitter]) -> type[Emitter]:
        cls.name = cls.__name__
        for keras_class in classes:
            EMITTERS.add(keras_class, cls())
        return cls

    return deco


# ------------------------------------------------------------------ small formatting helpers


def tup(values: Any, n: int) -> tuple[int, ...]:
    """A Keras int-or-tuple hyper-parameter as an n-tuple."""
    if isinstance(values, (list, tuple)):
        return tuple(int(v) for v in values)
    return (int(values),) * n


def short(values: tuple[Any, ...]) -> str:
    """``(3, 3)`` -> ``3``; ``(1, 3)`` stays a tuple (how people write kernel sizes)."""
    return repr(values[0]) if len(set(values)) == 1 else repr(tuple(values))


def call(fn: str, *args: Any, **kwargs: Any) -> str:
    """``fn(a, b, k=v)`` with keyword arguments left out when None."""
    parts = [str(a) for a in args] + [f"{k}={v}" for k, v in kwargs.items() if v is not None]
    return f"{fn}({', '.join(parts)})"


def number(x: float) -> str:
    """A float as people write it: 0.01 rather than 0.010000000000000009."""
    return repr(float(f"{float(x):.12g}"))


def comparable(rank: int, layout: str) -> bool:
    """Whether verification can compare this output with Keras' (it moves 4-d Keras outputs to
    NCHW and leaves the others as they are)."""
    return rank <= 2 or (rank == 4 and layout == CF) or (rank == 3 and layout == CL)


def channel_dim(rank: int, layout: str, axis: int) -> int:
    """The PyTorch dim of Keras axis ``axis`` (batch = 0) for a tensor in ``layout``."""
    axis = axis % rank
    if layout != CF or rank <= 2:
        return axis
    return 1 if axis == rank - 1 else axis + 1
