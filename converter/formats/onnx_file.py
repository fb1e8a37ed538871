"""ONNX models (``.onnx``, external-data files too), read as data with the ``onnx`` package
(the optional extra ``ckptport[onnx]``): the protobuf is parsed, never run; initializers (and
``Constant`` nodes) become lazily loaded tensors, and the graph is kept for the layer view
(:mod:`converter.onnx_graph`).

(The module is not named ``onnx`` so that it never shadows the PyPI package.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FrameworkMissingError, SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register

ONNX_EXTRA = "pip install 'ckptport[onnx]'"


def import_onnx() -> Any:
    """The ``onnx`` package, or one line naming the extra that installs it."""
    try:
        import onnx
    except ImportError:
        raise FrameworkMissingError(
            f"reading ONNX files needs the onnx package: {ONNX_EXTRA}"
        ) from None
    return onnx


@dataclass
class OnnxCheckpoint(RawCheckpoint):
    """An ONNX file read: its tensors (initializers, Constant nodes) plus the parsed graph."""

    graph: Any = None  # converter.onnx_graph.OnnxGraph


@register
class Onnx(Format):
    name = "onnx"
    description = "ONNX model (.onnx, external data too), read as data (needs ckptport[onnx])"
    extensions = (".onnx",)

    def sniff(self, path: Path) -> bool:
        """A ``.onnx`` file whose first protobuf field is ModelProto's ir_version (tag 0x08)."""
        if not (path.is_file() and path.suffix.lower() == ".onnx"):
            return False
        with open(path, "rb") as fh:
            return fh.read(1) == b"\x08"

    def read(self, path: Path) -> RawCheckpoint:
        onnx = import_onnx()
        from ..onnx_graph import parse_graph

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError on a damaged or truncated file
            raise SourceFormatError(
                f"{path} cannot be parsed as an ONNX model ({str(exc).splitlines()[0]}); the file"
                " is damaged or truncated"
            ) from exc
        graph = parse_graph(model, path)
        tensors = {
            key: RawTensor(key, shape, dtype, loader)
            for key, (shape, dtype, loader) in graph.constants.items()
        }
        return OnnxCheckpoint(path, self.name, tensors, ignored=dict(graph.ignored), graph=graph)
