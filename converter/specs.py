"""Model specs: the one parser for every place a model is named (``--to``, ``--source-model``,
``ckptport audit TARGET``, checkpoint metadata).

Forms::

    timm:NAME                   a timm model (never pretrained)
    torchvision:NAME            a torchvision model (never pretrained)
    path/to/file.py:factory     a function in the user's own file
    package.module:factory      a function in an importable module of the user's

``./model.py:f`` and ``/abs/path/model.py:f`` are the same spec (``Spec.identity``). Parsing imports
nothing; building is :func:`converter.model.build_target` (PyTorch) or
:func:`converter.model.call_factory` (any user factory, e.g. a Keras one for ``--source-model``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConverterError

SPEC_FORMS = (
    "'torchvision:NAME', 'timm:NAME', 'path/to/file.py:factory' or 'package.module:factory'"
)
LIBRARIES = ("timm", "torchvision")
FOREIGN = ("keras", "tensorflow", "tf", "tf_keras", "jax", "flax", "onnx")
_IDENT = re.compile(r"[A-Za-z_]\w*")
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class SpecError(ConverterError):
    """A model spec that is not one of the accepted forms."""


@dataclass(frozen=True)
class Spec:
    """A parsed model spec. ``kind``: ``timm``, ``torchvision``, ``file`` or ``module``;
    ``location``: the library, the file path or the module path; ``name``: the model or factory
    name."""

    text: str
    kind: str
    location: str
    name: str

    @property
    def is_library(self) -> bool:
        return self.kind in LIBRARIES

    @property
    def path(self) -> Path:
        if self.kind != "file":
            raise ValueError(f"{self.text} names no file")
        return Path(self.location)

    @property
    def identity(self) -> str:
        """What makes two specs the same model: the resolved file path for ``file`` specs."""
        if self.kind == "file":
            return f"{Path(self.location).expanduser().resolve()}:{self.name}"
        return (
            f"{self.location}:{self.name}" if self.kind == "module" else f"{self.kind}:{self.name}"
        )

    def __str__(self) -> str:
        return self.text


def looks_like_spec(text: str) -> bool:
    """True when ``text`` parses as a model spec (used where a spec and a file path are both
    accepted)."""
    try:
        parse_spec(text)
    except SpecError:
        return False
    return True


def parse_spec(text: str, what: str = "model spec") -> Spec:
    """Parse ``text`` into a :class:`Spec`, or raise SpecError naming the accepted forms."""
    if isinstance(text, str) and ":" not in text and text.endswith(".py"):
        raise SpecError(f"{what} {text!r} names a file but no function: add ':factory'")
    if not isinstance(text, str) or ":" not in text:
        raise SpecError(f"{what} {text!r} is not one of {SPEC_FORMS}")
    lib, _, rest = text.partition(":")
    if lib in LIBRARIES:
        if not rest or not re.fullmatch(r"[\w.\-]+", rest):
            raise SpecError(
                f"{what} {text!r}: give a model name after '{lib}:', e.g. '{lib}:resnet50'"
            )
        return Spec(text, lib, lib, rest)
    if lib in FOREIGN:
        raise SpecError(
            f"{what} {text!r} names a {lib} model; a PyTorch model spec is one of {SPEC_FORMS}"
        )
    left, _, fn = text.rpartition(":")
    if not left or not _IDENT.fullmatch(fn or ""):
        raise SpecError(f"{what} {text!r} must end in ':function' and look like {SPEC_FORMS}")
    if left.endswith(".py") or os.sep in left or "/" in left:
        return Spec(text, "file", left, fn)
    if _MODULE.fullmatch(left):
        return Spec(text, "module", left, fn)
    raise SpecError(f"{what} {text!r} is not one of {SPEC_FORMS}")


def same_spec(a: str, b: str) -> bool:
    """True when two spec strings name the same model (``./m.py:f`` == ``/abs/m.py:f``)."""
    if a == b:
        return True
    try:
        return parse_spec(a).identity == parse_spec(b).identity
    except SpecError:
        return False
