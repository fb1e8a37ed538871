"""safetensors, ckptport's default output: read by memory-mapping each tensor, written by hand so
the same input gives the same bytes.

(The module is not named ``safetensors`` so that it never shadows the PyPI package.)"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register
from .direct_io import DirectFile, open_direct
from .writeback import start_writeback

_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
_NP_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


@register
class Safetensors(Format):
    name = "safetensors"
    description = "safetensors (ckptport's default output)"
    extensions = (".safetensors",)
    can_write = True

    def sniff(self, path: Path) -> bool:
        if not path.is_file() or path.stat().st_size < 10:
            return False
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            return 0 < n < 100_000_000 and fh.read(1) == b"{"

    def read(self, path: Path) -> RawCheckpoint:
        size = path.stat().st_size
        header, base = _read_header(path, size)
        meta = header.pop("__metadata__", {}) or {}
        tensors: dict[str, RawTensor] = {}
        for key, info in header.items():
            start, end = info["data_offsets"]
            if base + end > size:
                raise SourceFormatError(
                    f"{path} is truncated: tensor {key!r} ends past the end of the file"
                )
            dtype = _NP_DTYPES.get(info["dtype"])
            if dtype is None:
                raise SourceFormatError(
                    f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}"
                )
            shape = tuple(info["shape"])

            def load(start=start, dtype=dtype, shape=shape):
                arr = np.memmap(
                    path,
                    dtype=_np_dtype(dtype),
                    mode="r",
                    offset=base + start,
                    shape=shape if shape else (1,),
                )
                return np.array(arr).reshape(shape)

            tensors[key] = RawTensor(key, shape, dtype, load)
        return RawCheckpoint(path, self.name, tensors, metadata=meta)

    def write(self, path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        layout = Layout.plan({k: (str(a.dtype), tuple(a.shape)) for k, a in tensors.items()})
        with open(path, "wb") as fh:
            fh.write(layout.header(metadata))
            for key in layout.order:
                fh.write(_raw_bytes(tensors[key]))


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """The JSON header and the offset where tensor data starts."""
    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        if 8 + n > size:
            raise SourceFormatError(f"{path} is truncated (header says {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except json.JSONDecodeError as exc:
            raise SourceFormatError(f"{path} has a corrupt safetensors header ({exc})") from exc
    return header, 8 + n


# ------------------------------------------------------------------ layout and streamed writes

#: header room kept for the metadata, beyond the tensor entries: a streamed write places the data
#: before the metadata is known (it is only complete once every tensor is converted)
METADATA_ROOM = 16384
METADATA_ROOM_PER_TENSOR = 512
CHUNK_BYTES = 16 << 20  # moving the data after an outgrown header: this much at a time


@dataclass
class Layout:
    """Where each tensor goes in a safetensors file: keys sorted, data packed in that order, the
    header padded with spaces to a room planned from the tensors alone (so a file written tensor
    by tensor before its metadata is known has the same bytes as one written at once; a header
    that outgrows the room is written exact instead)."""

    entries: dict[str, tuple[str, tuple[int, ...]]]  # key -> (numpy dtype name, shape)
    order: list[str]
    offsets: dict[str, tuple[int, int]]
    room: int  # bytes the header is padded to when it fits

    @classmethod
    def plan(cls, entries: dict[str, tuple[str, tuple[int, ...]]]) -> "Layout":
        order = sorted(entries)
        offsets, offset = {}, 0
        for key in order:
            dtype, shape = entries[key]
            if dtype not in _ST_DTYPES:
                raise SourceFormatError(
                    f"cannot write tensor {key!r} of dtype {dtype} to safetensors"
                )
            end = offset + int(np.prod(shape, dtype=np.int64)) * _np_dtype(dtype).itemsize
            offsets[key], offset = (offset, end), end
        layout = cls(entries, order, offsets, 0)
        bare = len(_json(layout._tensor_header()))
        layout.room = _round8(bare + METADATA_ROOM + METADATA_ROOM_PER_TENSOR * len(order))
        return layout

    @property
    def data_bytes(self) -> int:
        return self.offsets[self.order[-1]][1] if self.order else 0

    def _tensor_header(self) -> dict[str, object]:
        return {
            key: {
                "dtype": _ST_DTYPES[self.entries[key][0]],
                "shape": list(self.entries[key][1]),
                "data_offsets": list(self.offsets[key]),
            }
            for key in self.order
        }

    def header_blob(self, metadata: dict[str, str]) -> bytes:
        """The JSON header, padded with spaces to ``room`` (or to 8 bytes when it is larger)."""
        header = self._tensor_header()
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
        blob = _json(header)
        size = self.room if len(blob) <= self.room else _round8(len(blob))
        return blob + b" " * (size - len(blob))

    def header(self, metadata: dict[str, str]) -> bytes:
        """The file's first bytes: the header's length, then the header."""
        blob = self.header_blob(metadata)
        return struct.pack("<Q", len(blob)) + blob


class SafetensorsStream:
    """A safetensors file written tensor by tensor, in any order, at the offsets its ``Layout``
    gives (the same bytes as ``Safetensors.write`` of the whole state dict): ``put`` hands one
    tensor to a writer thread (the conversion goes on meanwhile), ``get`` reads one back,
    ``finish`` writes the header once the metadata is known. With ``direct`` the writes bypass
    the page cache where the file system allows it (formats.direct_io); the bytes are the same."""

    def __init__(self, path: Path, layout: Layout, direct: bool = False) -> None:
        self.path, self.layout = Path(path), layout
        self.base = 8 + layout.room
        # no O_TRUNC (the temporary file is new): ext4 flushes a truncated file's data on close
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.direct = open_direct(self.path, self.base + layout.data_bytes) if direct else None
        self.writer = _BackgroundWriter(self.fd, self.direct)
        self.written: set[str] = set()

    def put(self, key: str, array: np.ndarray) -> None:
        if self.layout.entries.get(key) != (str(array.dtype), tuple(array.shape)):
            raise SourceFormatError(
                f"{self.path}: tensor {key!r} is {array.dtype}{tuple(array.shape)}, the layout"
                f" planned {self.layout.entries.get(key)}"
            )
        offset = self.base + self.layout.offsets[key][0]
        self.writer.write(_raw_bytes(array), offset, again=key in self.written)  # adjusted
        self.written.add(key)

    def get(self, key: str) -> np.ndarray:
        self._readable()
        dtype, shape = self.layout.entries[key]
        start, end = self.layout.offsets[key]
        data = os.pread(self.fd, end - start, self.base + start)
        return np.frombuffer(data, dtype=_np_dtype(dtype).newbyteorder("<")).reshape(shape).copy()

    def _readable(self) -> None:
        """Every write done and readable from the file (a direct file's staged blocks too)."""
        self.writer.drain()
        if self.direct is not None:
            self.direct.flush(partial=True)

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header; every tensor must have been put. A header larger than the planned
        room moves the data once (rare: metadata beyond the room planned per tensor)."""
        missing = [k for k in self.layout.order if k not in self.written]
        if missing:
            raise SourceFormatError(f"{self.path}: tensors never written: {missing[:5]}")
        head = self.layout.header(metadata)
        if len(head) == self.base:
            self.writer.write(np.frombuffer(head, np.uint8), 0)
            self.writer.drain()
            if self.direct is not None:
                self.direct.finish()
        else:
            self._readable()
            self._rewrite_with(head)
        self.close()

    def _rewrite_with(self, head: bytes) -> None:
        moved = self.path.with_name(self.path.name + ".moved")
        try:
            with open(moved, "wb") as out:
                out.write(head)
                offset, end = self.base, self.base + self.layout.data_bytes
                while offset < end:  # (a direct file's last block is whole until finished)
                    chunk = os.pread(self.fd, min(CHUNK_BYTES, end - offset), offset)
                    if not chunk:
                        raise SourceFormatError(f"{self.path}: shorter than its layout")
                    out.write(chunk)
                    offset += len(chunk)
            os.replace(moved, self.path)
        finally:
            moved.unlink(missing_ok=True)

    def close(self) -> None:
        """Stop the writer and close the file (after ``finish``, or on failure: the caller
        removes the partial file)."""
        if self.fd >= 0:
            self.writer.stop()
            if self.direct is not None:
                self.direct.close()
            os.close(self.fd)
            self.fd = -1


class _BackgroundWriter:
    """Writes (bytes, offset) items with ``os.pwrite`` in a thread, so that converting the next
    layer overlaps writing this one (file writes release the GIL). At most ``IN_FLIGHT_BYTES`` wait
    (or one larger tensor), so memory stays bounded; a write error is raised in the caller at its
    next ``write``/``drain``. Each written range's writeback is started at once
    (formats.writeback), or, given a ``DirectFile``, the writes go through it."""

    IN_FLIGHT_BYTES = 32 << 20

    def __init__(self, fd: int, direct: DirectFile | None = None) -> None:
        self.fd, self.items, self.pending, self.error = fd, [], 0, None
        self.direct = direct
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="safetensors-writer")
        self.stopping = False
        self.thread.start()

    def write(self, data: np.ndarray, offset: int, again: bool = False) -> None:
        """Queue ``data`` for ``offset`` (``again``: a range written before, rewritten)."""
        with self.cond:
            while self.pending and self.pending + data.nbytes > self.IN_FLIGHT_BYTES:
                self._raise()
                self.cond.wait()
            self._raise()
            self.items.append((data, offset, again))
            self.pending += data.nbytes
            self.cond.notify_all()

    def drain(self) -> None:
        """Wait until every write is done (the thread then waits for the next one: its
        ``DirectFile`` may be used by the caller until then)."""
        with self.cond:
            while self.pending and self.error is None:
                self.cond.wait()
            self._raise()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items and not self.stopping:
                    self.cond.wait()
                if not self.items:
                    return
                data, offset, again = self.items.pop(0)
            try:
                self._write(data, offset, again)
            except OSError as exc:
                with self.cond:
                    self.error = exc
            with self.cond:
                self.pending -= data.nbytes
                self.cond.notify_all()

    def _write(self, data: np.ndarray, offset: int, again: bool) -> None:
        view = memoryview(data).cast("B")
        if self.direct is not None:
            self.direct.write(view, offset, again)
            return
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        start_writeback(self.fd, offset, done)


def _raw_bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes, little-endian, as a flat uint8 view (no copy when it is contiguous and
    little-endian already)."""
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return array.reshape(-1).view(np.uint8)


def _json(header: dict[str, object]) -> bytes:
    return json.dumps(header, separators=(",", ":"), sort_keys=True).encode()


def _round8(n: int) -> int:
    return n + (-n % 8)
