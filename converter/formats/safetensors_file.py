"""safetensors, ckptport's default output: read by memory-mapping each tensor, written by hand so
the same input gives the same bytes.

(The module is not named ``safetensors`` so that it never shadows the PyPI package.)"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register

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
        header: dict[str, object] = {}
        offset = 0
        order = sorted(tensors)
        for key in order:
            arr = tensors[key]
            dt = _ST_DTYPES.get(str(arr.dtype))
            if dt is None:
                raise SourceFormatError(
                    f"cannot write tensor {key!r} of dtype {arr.dtype} to safetensors"
                )
            end = offset + arr.nbytes
            header[key] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, end]}
            offset = end
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
        blob = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for key in order:
                arr = np.ascontiguousarray(tensors[key])
                fh.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())


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
