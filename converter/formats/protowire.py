"""A minimal protobuf wire-format reader (no generated classes, no tensorflow import).

TensorFlow's files are protobufs (``saved_model.pb``, ``keras_metadata.pb``, a ``.meta`` graph, a
checkpoint's object graph); ckptport needs a handful of fields of each, read here by field number.
Field numbers are TensorFlow's (``saved_model.proto``, ``meta_graph.proto``, ``graph.proto``, ...);
the readers that use them name the proto message and field where they do.
"""

from __future__ import annotations

import struct
from typing import Iterator

__all__ = [
    "ProtoError", "fields", "field_map", "first", "repeated", "text", "as_float", "as_ints",
]  # fmt: skip


class ProtoError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value): an int for varint/fixed fields, bytes for
    length-delimited ones (sub-messages, strings, packed repeated scalars)."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            val, pos = varint(buf, pos)
            yield num, wire, val
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > n:
                raise ProtoError("truncated fixed field")
            yield num, wire, int.from_bytes(buf[pos : pos + size], "little")
            pos += size
        elif wire == 2:
            length, pos = varint(buf, pos)
            if pos + length > n:
                raise ProtoError("truncated length-delimited field")
            yield num, wire, buf[pos : pos + length]
            pos += length
        else:
            raise ProtoError(f"unsupported wire type {wire}")


def repeated(buf: bytes, num: int) -> list[bytes]:
    """Every length-delimited value of field ``num`` (a repeated sub-message or string)."""
    return [v for f, w, v in fields(buf) if f == num and w == 2]


def first(buf: bytes, num: int) -> int | bytes | None:
    """The last value of field ``num`` (protobuf semantics for a singular field), or None."""
    out = None
    for f, _, v in fields(buf):
        if f == num:
            out = v
    return out


def field_map(buf: bytes) -> dict[int, list[tuple[int, int | bytes]]]:
    """Field number -> [(wire type, value), ...] in file order."""
    out: dict[int, list[tuple[int, int | bytes]]] = {}
    for f, w, v in fields(buf):
        out.setdefault(f, []).append((w, v))
    return out


def text(buf: bytes, num: int) -> str:
    """A string field (empty when absent)."""
    v = first(buf, num)
    return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else ""


def as_ints(wire: int, value: int | bytes) -> list[int]:
    """An integer field's values: one varint, or packed varints."""
    if wire == 0 and isinstance(value, int):
        return [value]
    out, pos = [], 0
    while isinstance(value, bytes) and pos < len(value):
        v, pos = varint(value, pos)
        out.append(v)
    return out


def as_float(wire: int, value: int | bytes) -> list[float]:
    """A float field's values: a fixed32 scalar, or packed fixed32s."""
    if wire == 5 and isinstance(value, int):
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    if wire == 2 and isinstance(value, bytes) and len(value) % 4 == 0:
        return list(struct.unpack(f"<{len(value) // 4}f", value))
    return []
