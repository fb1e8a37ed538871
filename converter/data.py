"""Model-input data for BN recalibration: arrays read on demand, never unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from .errors import SourceFormatError

_NPZ_KEYS = ("x", "inputs", "input", "images", "data")


class ArrayData:
    """Samples stacked on axis 0, read on demand: a .npy (memory-mapped), one array of a .npz, or a
    folder of .npy files holding one sample each (sorted by name). Never unpickles."""

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        import numpy as np

        self.path = Path(path)
        self._files: list[Path] = []
        self._array: Any = None
        p = self.path
        if p.is_dir():
            self._open_folder(p)
        elif not p.exists():
            raise SourceFormatError(f"--data {p}: no such file or folder")
        elif p.suffix == ".npy":
            try:
                self._array = np.load(p, mmap_mode="r", allow_pickle=False)
            except Exception as exc:
                raise SourceFormatError(f"--data {p}: not a readable .npy array ({exc})") from exc
            self._set_from_array()
        elif p.suffix == ".npz":
            self._array = _npz_array(p, key)
            self._set_from_array()
        else:
            raise SourceFormatError(
                f"--data {p}: expected a .npy file, a .npz file or a folder of .npy files"
            )
        if not np.issubdtype(self.dtype, np.floating):
            raise SourceFormatError(
                f"--data {p} holds {self.dtype} values; give float inputs preprocessed exactly as"
                " the model expects (scaled/normalized, channels first)"
            )

    def _open_folder(self, p: Path) -> None:
        self._files = sorted(f for f in p.iterdir() if f.suffix == ".npy" and f.is_file())
        if not self._files:
            raise SourceFormatError(
                f"--data {p}: folder holds no .npy files (one sample per file expected)"
            )
        first = self._load_file(self._files[0])
        self.sample_shape: tuple[int, ...] = tuple(first.shape)
        self.dtype = first.dtype
        self.size = len(self._files)

    def _set_from_array(self) -> None:
        arr = self._array
        if arr.ndim < 2:
            raise SourceFormatError(
                f"--data {self.path}: array of shape {arr.shape}; expected samples stacked on axis"
                " 0, e.g. (N, C, H, W)"
            )
        self.sample_shape = tuple(arr.shape[1:])
        self.dtype = arr.dtype
        self.size = int(arr.shape[0])

    def _load_file(self, f: Path) -> Any:
        import numpy as np

        try:
            return np.load(f, allow_pickle=False)
        except Exception as exc:
            raise SourceFormatError(f"--data {f}: not a readable .npy array ({exc})") from exc

    def take(self, idx: list[int]) -> Any:
        """The samples at ``idx``, stacked."""
        import numpy as np

        if self._array is not None:
            return np.asarray(self._array[np.asarray(idx)])
        out = []
        for i in idx:
            a = self._load_file(self._files[i])
            if tuple(a.shape) != self.sample_shape:
                raise SourceFormatError(
                    f"--data {self._files[i]} has shape {a.shape}, but {self._files[0].name} has "
                    f"{self.sample_shape}; every file must hold one sample of the same shape"
                )
            out.append(a)
        return np.stack(out)


def iter_batches(
    data: ArrayData, num_batches: int, batch_size: int, shuffle: bool, seed: int, dtype: Any
) -> Iterator[Any]:
    """``num_batches`` full batches of ``batch_size`` distinct samples as torch tensors of
    ``dtype``."""
    import numpy as np
    import torch

    order = np.random.default_rng(seed).permutation(data.size) if shuffle else np.arange(data.size)
    for b in range(num_batches):
        idx = sorted(
            int(i) for i in order[b * batch_size : (b + 1) * batch_size]
        )  # sorted: faster reads
        yield torch.from_numpy(np.ascontiguousarray(data.take(idx))).to(dtype)


def _npz_array(p: Path, key: str | None) -> Any:
    """The input array of a .npz: ``key``, the only array, or the first conventional name."""
    import numpy as np

    try:
        npz = np.load(p, allow_pickle=False)
        keys = list(npz.files)
    except Exception as exc:
        raise SourceFormatError(f"--data {p}: not a readable .npz archive ({exc})") from exc
    if key is None:
        found = [k for k in _NPZ_KEYS if k in keys]
        if len(keys) == 1:
            key = keys[0]
        elif found:
            key = found[0]
        else:
            raise SourceFormatError(
                f"--data {p} holds arrays {', '.join(keys) or '(none)'}; name the input"
                " array with --key"
            )
    if key not in keys:
        raise SourceFormatError(
            f"--data {p} has no array {key!r}; it holds {', '.join(keys) or '(none)'}"
        )
    try:
        return npz[key]
    except Exception as exc:
        raise SourceFormatError(f"--data {p}: array {key!r} cannot be read ({exc})") from exc
