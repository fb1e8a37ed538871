"""``ckptport recalibrate CKPT --data DATA -o OUT``: recompute BN running stats (precise BN).

The checkpoint is one ckptport wrote; the output is the same checkpoint with new running
statistics and a ``recalibrated`` metadata record. The input file is never touched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import click

from ..errors import ConverterError, OutputExistsError, SourceFormatError
from .common import EXIT_OK, emit_json, force_option, json_option, stderr_console

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
            self._files = sorted(f for f in p.iterdir() if f.suffix == ".npy" and f.is_file())
            if not self._files:
                raise SourceFormatError(f"--data {p}: folder holds no .npy files (one sample per file expected)")
            first = self._load_file(self._files[0])
            self.sample_shape: tuple[int, ...] = tuple(first.shape)
            self.dtype = first.dtype
            self.size = len(self._files)
        elif not p.exists():
            raise SourceFormatError(f"--data {p}: no such file or folder")
        elif p.suffix == ".npy":
            try:
                self._array = np.load(p, mmap_mode="r", allow_pickle=False)
            except Exception as exc:
                raise SourceFormatError(f"--data {p}: not a readable .npy array ({exc})") from exc
            self._set_from_array()
        elif p.suffix == ".npz":
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
                        f"--data {p} holds arrays {', '.join(keys) or '(none)'}; name the input array with --key"
                    )
            if key not in keys:
                raise SourceFormatError(f"--data {p} has no array {key!r}; it holds {', '.join(keys) or '(none)'}")
            try:
                self._array = npz[key]
            except Exception as exc:
                raise SourceFormatError(f"--data {p}: array {key!r} cannot be read ({exc})") from exc
            self._set_from_array()
        else:
            raise SourceFormatError(f"--data {p}: expected a .npy file, a .npz file or a folder of .npy files")
        if not np.issubdtype(self.dtype, np.floating):
            raise SourceFormatError(
                f"--data {p} holds {self.dtype} values; give float inputs preprocessed exactly as the model "
                "expects (scaled/normalized, channels first)"
            )

    def _set_from_array(self) -> None:
        arr = self._array
        if arr.ndim < 2:
            raise SourceFormatError(
                f"--data {self.path}: array of shape {arr.shape}; expected samples stacked on axis 0, e.g. (N, C, H, W)"
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


def iter_batches(data: ArrayData, num_batches: int, batch_size: int, shuffle: bool, seed: int,
                 dtype: Any) -> Iterator[Any]:
    """``num_batches`` full batches of ``batch_size`` distinct samples as torch tensors of ``dtype``."""
    import numpy as np
    import torch

    order = np.random.default_rng(seed).permutation(data.size) if shuffle else np.arange(data.size)
    for b in range(num_batches):
        idx = sorted(int(i) for i in order[b * batch_size:(b + 1) * batch_size])  # sorted: faster reads
        yield torch.from_numpy(np.ascontiguousarray(data.take(idx))).to(dtype)


@click.command("recalibrate")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option("--data", "data_path", required=True,
              help="Model inputs: a .npy (N, ...) array, a .npz (one array, or --key) or a folder of "
                   "one-sample .npy files; float, preprocessed as the PyTorch model expects.")
@click.option("--num-batches", type=click.IntRange(min=1), required=True, help="Batches to average over.")
@click.option("--batch-size", type=click.IntRange(min=2), required=True,
              help="Samples per batch (the batch size the model trains with is a good choice).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output checkpoint (.safetensors or .pt).")
@click.option("--key", default=None, help="Array name inside a .npz.")
@click.option("--shuffle/--no-shuffle", default=True, show_default=True,
              help="Draw batches at random (class-sorted data otherwise biases the variance).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle.")
@click.option("--device", default="cpu", show_default=True, help="Torch device for the forward passes.")
@force_option
@json_option
def command(ckpt: str, data_path: str, num_batches: int, batch_size: int, output: str, key: str | None,
            shuffle: bool, seed: int, device: str, force: bool, as_json: bool) -> int:
    """Recompute the BN running stats of CKPT as the true average over --num-batches batches.

    Weights stay fixed; only BN modules run in train mode (dropout etc. off), without gradients.
    Writes OUT with the new statistics; CKPT is never modified.
    """
    src, out = Path(ckpt), Path(output)
    if not src.is_file():
        raise SourceFormatError(f"{src}: no such checkpoint file")
    if out.exists() and out.resolve() == src.resolve():
        raise ConverterError(f"-o {out} is the input checkpoint; write to a new file (the input is never modified)")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to overwrite it")
    data = ArrayData(data_path, key)
    need = num_batches * batch_size
    if data.size < need:
        raise ConverterError(
            f"--data {data.path} holds {data.size} samples = {data.size // batch_size} full batches of "
            f"{batch_size}, but --num-batches {num_batches} needs {need} samples; give more data or "
            "lower --num-batches/--batch-size"
        )

    import torch

    from .. import bn
    from ..formats import write_checkpoint
    from ..model import load_model

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConverterError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConverterError(f"--device {device}: no CUDA device is available here; use --device cpu")
    model = load_model(src, device=device)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    batches = iter_batches(data, num_batches, batch_size, shuffle, seed, dtype)
    result = bn.recalibrate(model, batches, num_batches, device=device)
    meta = dict(getattr(model, "ckptport_metadata", None) or {})
    meta["recalibrated"] = json.dumps({
        "method": "precise BN: mean of per-batch means and unbiased variances",
        "data": data.path.name,
        "num_batches": num_batches,
        "batch_size": batch_size,
        "num_samples": result["num_samples"],
        "shuffle": shuffle,
        "seed": seed,
        "modules": len(result["modules"]),
        "skipped": result["skipped"],
    }, sort_keys=True)
    written = write_checkpoint(out, model.state_dict(), meta, force=force)
    if as_json:
        emit_json({"input": str(src), "output": str(written), **result})
    else:
        _print_changes(result)
        click.echo(
            f"recalibrated {len(result['modules'])} BN modules of {src} over {num_batches} batches of "
            f"{batch_size}; wrote {written}"
            + (f" ({len(result['skipped'])} skipped)" if result["skipped"] else "")
        )
    return EXIT_OK


def _print_changes(result: dict[str, Any], top: int = 10) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = sorted(result["changes"].items(), key=lambda kv: -kv[1]["var"])[:top]
    table = Table(title=f"largest running-stat changes (top {min(top, len(rows))} by variance)")
    table.add_column("module")
    table.add_column("max |Δ mean|", justify="right")
    table.add_column("max |Δ var| / var", justify="right")
    for name, ch in rows:
        table.add_row(escape(name), f"{ch['mean']:.4g}", f"{ch['var']:.4g}")
    for name, why in result["skipped"].items():
        table.add_row(escape(name), "skipped", escape(why))
    stderr_console().print(table)
