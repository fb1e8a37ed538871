"""File formats, one small verb set for all: ``sniff(path)``, ``read(path)``, ``write(path, ...)``.

Readers never execute model code: HDF5 and zip members are read as data, TF checkpoints by a
pure-Python tensor-bundle reader, PyTorch files with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import OutputExistsError, SourceFormatError, option
from ..registry import Registry


@dataclass
class RawTensor:
    """A tensor in a file, loaded on demand."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    loader: Callable[[], np.ndarray] = field(repr=False)

    def load(self) -> np.ndarray:
        try:
            arr = np.asarray(self.loader())
        except SourceFormatError:
            raise
        except Exception as exc:  # h5py / zip / IO errors on a damaged file
            raise SourceFormatError(
                f"cannot read tensor {self.key!r}: {exc}; the file is damaged"
            ) from exc
        if tuple(arr.shape) != tuple(self.shape):
            raise SourceFormatError(
                f"tensor {self.key!r} has shape {arr.shape}, its header says {self.shape}"
            )
        return arr


@dataclass
class RawCheckpoint:
    """What a reader returns: tensors by their key in the file, plus whatever config the file
    holds."""

    path: Path
    format: str
    tensors: dict[str, RawTensor]
    model_config: dict[str, Any] | None = None  # Keras model config (Functional), when stored
    group_names: dict[str, str] = field(default_factory=dict)  # .weights.h5 group -> layer name
    metadata: dict[str, str] = field(default_factory=dict)  # our own outputs' metadata
    ignored: dict[str, str] = field(default_factory=dict)  # key -> why it is not model state
    # TF object-graph key -> (nested model or "", layer name, variable), when the file maps them
    object_paths: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how the file was read, for the user
    shadows: dict[str, RawTensor] = field(default_factory=dict)  # key -> its EMA shadow (TF1)
    # layers inferred from variable names (TF1), used only when no shipped architecture fits
    fallback_config: dict[str, Any] | None = None
    _sha256: str | None = field(default=None, repr=False)
    _hashing: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def start_hashing(self) -> None:
        """Hash the file(s) in a background thread while the conversion reads them (hashlib and
        file reads release the GIL): ``sha256`` then waits only for what is left."""
        if self._sha256 is None and self._hashing is None:
            self._stop.clear()
            self._hashing = threading.Thread(target=self._hash, daemon=True, name="sha256")
            self._hashing.start()

    def _hash(self) -> None:
        try:
            self._sha256 = sha256_path(self.path, self._stop)
        except (OSError, HashStopped):
            pass  # ``sha256`` hashes again in the caller and raises there

    def stop_hashing(self) -> None:
        """Stop the background hash and wait for its thread: a conversion that failed needs no
        digest, and no thread of its own may outlive it (a daemon thread still running at
        interpreter exit can be frozen while it holds a lock, e.g. h5py's, that the exit needs)."""
        if self._hashing is not None:
            self._stop.set()
            self._hashing.join()
            self._hashing = None

    @contextmanager
    def hashing_stopped_on_error(self) -> Iterator[None]:
        """Within the block, any exception (a refusal, Ctrl-C) stops the background hash first."""
        try:
            yield
        except BaseException:
            self.stop_hashing()
            raise

    @property
    def sha256(self) -> str:
        if self._hashing is not None:
            self._hashing.join()
            self._hashing = None
        if self._sha256 is None:
            self._sha256 = sha256_path(self.path)
        return self._sha256


class Format:
    """A file format: ``sniff`` says whether a path is one, ``read``/``write`` move tensors."""

    name = "format"
    description = ""
    extensions: tuple[str, ...] = ()
    container = ""  # what a file with these extensions must be ("an HDF5 file"), for messages
    can_read = True
    can_write = False

    def sniff(self, path: Path) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def read(self, path: Path) -> RawCheckpoint:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        raise SourceFormatError(f"ckptport cannot write {self.name} files")


FORMATS: Registry[Format] = Registry("format")


def register(cls: type[Format]) -> type[Format]:
    FORMATS.add(cls.name, cls())
    return cls


class HashStopped(Exception):
    """``sha256_path`` was asked to stop (RawCheckpoint.stop_hashing)."""


def sha256_path(path: Path, stop: threading.Event | None = None) -> str:
    """The sha256 of a file, of a TF checkpoint prefix's files, or of a directory's files with
    their relative names; ``stop`` set: HashStopped at the next 1 MiB."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else _bundle_files(p)
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                if stop is not None and stop.is_set():
                    raise HashStopped(str(path))
                h.update(chunk)
    return h.hexdigest()


def _bundle_files(p: Path) -> list[Path]:
    if p.is_file():
        return [p]
    return sorted(p.parent.glob(p.name + ".*"))  # a TF checkpoint prefix: index + shards


def _check_exists(path: Path) -> None:
    if not path.exists() and not list(path.parent.glob(path.name + ".index")):
        raise SourceFormatError(f"{path}: no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise SourceFormatError(f"{path} is empty (0 bytes); the copy or download did not finish")


def sniff(path: str | os.PathLike) -> str:
    """Name of the format of ``path``, or SourceFormatError listing the formats we read."""
    p = Path(path)
    _check_exists(p)
    for name, fmt in FORMATS.in_order():
        if fmt.can_read and fmt.sniff(p):
            return name
    claimed = [f for _, f in FORMATS.in_order() if f.container and p.name.endswith(f.extensions)]
    if claimed and p.is_file():  # named like a format whose container it is not
        raise SourceFormatError(f"{p} is not {claimed[0].container}: truncated or corrupt")
    known = ", ".join(
        f"{f.name} ({'/'.join(f.extensions)})" for _, f in FORMATS.in_order() if f.can_read
    )
    raise SourceFormatError(f"{p} is not a format ckptport reads; known formats: {known}")


def read(path: str | os.PathLike, format: str | None = None) -> RawCheckpoint:
    """Read any supported file into a RawCheckpoint (tensors stay on disk until loaded)."""
    p = Path(path)
    _check_exists(p)
    name = format or sniff(p)
    fmt = FORMATS.get(name)
    if format and not fmt.sniff(p):
        raise SourceFormatError(f"{p} is not a {name} file (it looks like {sniff(p)})")
    return fmt.read(p)


def output_format_for(path: Path, format: str | None) -> str:
    if format:
        return format
    return "pt" if path.suffix in (".pt", ".pth", ".bin") else "safetensors"


def write(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    metadata: dict[str, str] | None = None,
    format: str | None = None,
    force: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write tensors atomically (temp file + rename); refuse to overwrite unless ``force``."""
    p = Path(path)
    fmt = FORMATS.get(output_format_for(p, format))
    if not fmt.can_write:
        raise SourceFormatError(f"cannot write {fmt.name}; output formats: safetensors, pt")
    check_output(p, force, inputs)
    arrays = {k: _to_numpy(v) for k, v in tensors.items()}
    return write_atomic(
        p, lambda tmp: fmt.write(tmp, arrays, dict(metadata or {})), force=force, inputs=inputs
    )


def check_output(
    path: str | os.PathLike, force: bool, inputs: tuple[str | os.PathLike, ...] = ()
) -> Path:
    """The one output policy: refuse a path that is one of the inputs, a directory, in a missing
    directory, or an existing file without ``force``. Called early (before long work) and at write.
    """
    p = Path(path)
    for src in inputs:
        s = Path(src)
        if s.exists() and p.exists() and os.path.samefile(s, p) or p.resolve() == s.resolve():
            raise OutputExistsError(f"output {p} is the input file {s}; choose another output name")
    if p.is_dir():
        raise OutputExistsError(f"{p} is a directory; give an output file name")
    if not p.parent.exists():
        raise SourceFormatError(f"output directory {p.parent} does not exist; create it first")
    if p.exists() and not force:
        raise OutputExistsError(f"{p} exists; pass {option('force=True')} to overwrite it")
    return p


def write_atomic(
    path: str | os.PathLike,
    writer: Callable[[Path], None],
    force: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Run ``writer(tmp)`` on a temporary file beside ``path`` and rename it into place (see
    :func:`atomic_output`)."""
    with atomic_output(path, force, inputs) as tmp:
        writer(tmp)
    return Path(path)


@contextmanager
def atomic_output(
    path: str | os.PathLike, force: bool = False, inputs: tuple[str | os.PathLike, ...] = ()
) -> Iterator[Path]:
    """A temporary file beside ``path`` to write, renamed into place when the block ends. The
    output policy is :func:`check_output`; the temporary file never survives a failure or a
    catchable termination signal (SIGINT, SIGTERM, SIGHUP)."""
    from ..interrupts import signals_raise

    p = check_output(path, force, inputs)
    with signals_raise():
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".partial", dir=p.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def stream_writer(path: Path, target_manifest: dict[str, Any], output_io: str = "auto") -> Any:
    """A safetensors file at ``path`` laid out for the manifest's tensors, written one tensor at a
    time (``put``), the header last (``finish``): see safetensors_file.SafetensorsStream.
    ``output_io``: ``direct``, ``buffered`` or ``auto`` (direct_io.choose, on this file's size)."""
    from .direct_io import choose
    from .safetensors_file import Layout, SafetensorsStream

    entries = {t["key"]: (t["dtype"], tuple(t["shape"])) for t in target_manifest["tensors"]}
    layout = Layout.plan(entries)
    return SafetensorsStream(path, layout, direct=choose(output_io, layout.data_bytes))


class FileTensors(Mapping):
    """A written file's tensors by key, each read when asked for (a streamed conversion's state
    dict: nothing held in memory)."""

    def __init__(self, path: str | os.PathLike, format: str | None = None) -> None:
        self.raw = read(path, format)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.raw.tensors[key].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw.tensors)

    def __len__(self) -> int:
        return len(self.raw.tensors)


write_checkpoint = write


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch tensor
        t = v.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

            return t.view(dtype=__import__("torch").int16).numpy().view("bfloat16")
        return t.numpy()
    return np.asarray(v)


# Register the built-in formats (import order = sniff order).
from . import keras_h5, safetensors_file, torch_file, tf, onnx_file  # noqa: E402,F401
