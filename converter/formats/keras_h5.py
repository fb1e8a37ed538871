"""Keras files: ``.keras`` (zip: config.json + model.weights.h5), ``.weights.h5`` (Keras 3),
legacy Keras 2 ``.h5`` (whole model or weights only). Read with h5py; nothing is executed."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(8) == HDF5_MAGIC


def _open_h5(source: Any, label: Path | str):
    import h5py

    try:
        return h5py.File(source, "r")
    except OSError as exc:
        raise SourceFormatError(
            f"{label} is truncated or not a valid HDF5 file; re-copy or re-save it"
        ) from exc


def _lowlevel_tensor(key: str, f: Any) -> RawTensor:
    """A dataset by its path, through h5py's low-level API (a tenth of the high-level cost for
    the hundreds of small datasets of a Keras file); read whole, into a fresh array."""
    import h5py

    dsid = h5py.h5d.open(f.id, key.encode())
    shape, dtype = tuple(dsid.shape), dsid.dtype

    def load() -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.size:
            dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, out)
        return out

    return RawTensor(key, shape, str(dtype), load)


def _read_weights_h5(f: Any, path: Path, fmt: str) -> RawCheckpoint:
    """Keras 3 layout: layers/<auto name>/vars/<i>, the vars group's attrs['name'] = layer name
    (a nested model: layers/<its auto name>/layers/<inner auto name>/vars/<i>). The layout is read
    from one walk of the file's names; each dataset is opened only for its shape and dtype."""
    ignored: dict[str, str] = {}
    if "layers" not in f:
        raise SourceFormatError(f"{path} has no 'layers' group: not a Keras 3 weights file")
    for top in f:
        if top != "layers":
            if top == "optimizer":
                ignored[top] = "optimizer state (not model weights)"
            elif top == "vars" and len(f[top]) == 0:
                continue
            else:
                ignored[top] = "not under layers/"
            continue
    tree: dict[str, Any] = {}
    f["layers"].visit(lambda name: _grow(tree, name))
    tensors: dict[str, RawTensor] = {}
    names: dict[str, str] = {}
    _layer_groups(f, tree, "", tensors, names)
    return RawCheckpoint(path, fmt, tensors, group_names=names, ignored=ignored)


def _grow(tree: dict[str, Any], name: str) -> None:
    node = tree
    for part in name.split("/"):
        node = node.setdefault(part, {})


def _layer_groups(
    f: Any, layers: dict[str, Any], prefix: str, tensors: dict[str, RawTensor], names: dict
) -> None:
    """``<prefix><group>/vars/<i>`` for every layer group; a nested model's group holds its own
    ``layers/`` (``functional/layers/conv2d``, at any depth): the resolver places it."""
    for group_name, group in layers.items():
        where = f"{prefix}{group_name}"
        if "layers" in group:
            _layer_groups(f, group["layers"], f"{where}/layers/", tensors, names)
        if "vars" not in group:
            continue
        attrs = f[f"layers/{where}/vars"].attrs
        names[where] = str(attrs.get("name", group_name))
        _vars(f, group, f"layers/{where}", tensors)


def _vars(f: Any, group: dict[str, Any], where: str, tensors: dict[str, RawTensor]) -> None:
    """``<where>/vars/<i>``, and those of sublayer groups (an LSTM's ``cell``, a Bidirectional's
    ``forward_layer/cell``) as ``<where>/<sublayer path>/vars/<i>``."""
    for idx in sorted(group.get("vars", {}), key=int):
        key = f"{where}/vars/{idx}"
        tensors[key] = _lowlevel_tensor(key, f)
    for name, sub in group.items():
        if name not in ("vars", "layers") and sub:
            _vars(f, sub, f"{where}/{name}", tensors)


@register
class KerasArchive(Format):
    name = "keras"
    description = "Keras 3 .keras archive (config.json + model.weights.h5)"
    extensions = (".keras",)
    container = "a valid .keras archive (zip)"

    def sniff(self, path: Path) -> bool:
        return path.is_file() and zipfile.is_zipfile(path) and _zip_has(path, "config.json")

    def read(self, path: Path) -> RawCheckpoint:
        try:
            with zipfile.ZipFile(path) as zf:
                config = json.loads(zf.read("config.json"))
                if "model.weights.h5" not in zf.namelist():
                    raise SourceFormatError(
                        f"{path} has no model.weights.h5 inside; re-save with model.save()"
                    )
                member = member_file(zf, path, "model.weights.h5")
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, EOFError) as exc:
            raise SourceFormatError(
                f"{path} is a damaged .keras archive ({exc}); re-save it"
            ) from exc
        try:
            f = _open_h5(member, f"{path}: its member model.weights.h5")
        except SourceFormatError:
            member.close()
            raise
        raw = _read_weights_h5(f, path, self.name)
        raw.model_config = config
        return raw


def member_file(zf: zipfile.ZipFile, path: Path, name: str) -> io.RawIOBase | IO[bytes]:
    """A read-only file object holding the archive member ``name``, never the whole member in
    memory: a window onto its bytes in the archive when it is stored uncompressed (what Keras
    writes), else the member extracted (streamed) to an anonymous temporary file, which the
    system removes when it is closed or the process exits, however it exits."""
    info = zf.getinfo(name)
    if info.compress_type == zipfile.ZIP_STORED:
        window = MemberWindow(path, member_data_offset(path, info), info.file_size)
        if window.crc32() != info.CRC:  # what zipfile checks on extraction
            window.close()
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {name!r}")
        return window
    tmp = tempfile.TemporaryFile()
    try:
        with zf.open(info) as src:
            shutil.copyfileobj(src, tmp, 1 << 20)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp


def member_data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a member's bytes start in the archive: after its local header, whose name and extra
    field lengths may differ from the central directory's."""
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for member {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class MemberWindow(io.RawIOBase):
    """Bytes ``start .. start + size`` of a file as a read-only, seekable file object (h5py
    reads an archive member through it in place)."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._fh = open(path, "rb", buffering=0)
        self._start, self._size, self._pos = start, size, 0
        if os.fstat(self._fh.fileno()).st_size < start + size:
            self._fh.close()
            raise zipfile.BadZipFile(f"{path.name} ends inside a member: truncated")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        got = os.preadv(self._fh.fileno(), [view[:n]], self._start + self._pos) if n else 0
        self._pos += got
        return got

    def crc32(self, chunk: int = 1 << 22) -> int:
        """The CRC-32 of the window's bytes (read in chunks; the position is kept)."""
        crc, pos, buf = 0, self._pos, bytearray(chunk)
        self._pos = 0
        while n := self.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
        self._pos = pos
        return crc

    def close(self) -> None:
        if not self.closed:
            self._fh.close()
        super().close()


def _zip_has(path: Path, member: str) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return member in zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _h5_kind(path: Path) -> str | None:
    if not _is_hdf5(path):
        return None
    try:
        import h5py

        with h5py.File(path, "r") as f:
            if "layers" in f:
                return "weights.h5"
            if "model_weights" in f or "layer_names" in f.attrs:
                return "h5"
    except OSError:
        # A truncated HDF5: claim it by extension so the reader gives the precise error.
        return "weights.h5" if path.name.endswith(".weights.h5") else "h5"
    return None


@register
class KerasWeightsH5(Format):
    name = "weights.h5"
    description = "Keras 3 weights file (model.save_weights)"
    extensions = (".weights.h5",)
    container = "an HDF5 file"

    def sniff(self, path: Path) -> bool:
        return _h5_kind(path) == "weights.h5"

    def read(self, path: Path) -> RawCheckpoint:
        return _read_weights_h5(_open_h5(path, path), path, self.name)


@register
class LegacyH5(Format):
    name = "h5"
    description = "legacy Keras 2 HDF5 (whole model or weights only)"
    extensions = (".h5", ".hdf5")
    container = "an HDF5 file"

    def sniff(self, path: Path) -> bool:
        return _h5_kind(path) == "h5"

    def read(self, path: Path) -> RawCheckpoint:
        f = _open_h5(path, path)
        config = None
        if "model_config" in f.attrs:
            cfg = f.attrs["model_config"]
            config = json.loads(cfg.decode() if isinstance(cfg, bytes) else cfg)
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            raise SourceFormatError(
                f"{path}: legacy HDF5 without layer_names; not a Keras weights file"
            )
        tensors: dict[str, RawTensor] = {}
        ignored = {k: "optimizer state (not model weights)" for k in f if k == "optimizer_weights"}
        for lname in _strs(root.attrs["layer_names"]):
            if lname not in root:
                raise SourceFormatError(
                    f"{path}: layer {lname!r} is listed but its group is missing (truncated file?)"
                )
            g = root[lname]
            for wname in _strs(g.attrs.get("weight_names", [])):
                if wname not in g:
                    raise SourceFormatError(
                        f"{path}: weight {lname}/{wname} is listed but missing (truncated file?)"
                    )
                key = f"{root.name.strip('/')}/{lname}/{wname}".lstrip("/")
                tensors[key] = _lowlevel_tensor(key, f)
        return RawCheckpoint(path, self.name, tensors, model_config=config, ignored=ignored)


def _strs(values: Any) -> list[str]:
    return (
        [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]
        if len(values)
        else []
    )
