"""Precise BN: recompute BatchNorm running statistics as the true average over N batches, in a
model (:func:`recalibrate`, averaged across ranks under ``torch.distributed``) or in a checkpoint
ckptport wrote (:func:`recalibrate_checkpoint`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from ..errors import ConverterError, InvalidTensorError, SourceFormatError
from .common import RECALIBRATING_ATTR, is_bn


def _batch_to(batch: Any, device: torch.device | str | None) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device) if device is not None else batch
    try:
        import numpy as np

        if isinstance(batch, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(batch))
            return t.to(device) if device is not None else t
    except ImportError:  # pragma: no cover
        pass
    if isinstance(batch, (tuple, list)):
        return type(batch)(_batch_to(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: _batch_to(v, device) for k, v in batch.items()}
    return batch


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_size(batch[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return _batch_size(v)
    return 0


def _forward(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(batch[0])  # (inputs, targets) as a DataLoader yields them
    else:
        model(batch)


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Recompute BN running statistics with fixed weights as the true average over ``num_batches``
    batches (precise BN).

    Every BatchNorm module that tracks running stats is reset, given ``momentum=None`` and put in
    train mode, everything else in eval mode (dropout off), and ``num_batches`` batches run through
    the model under ``torch.no_grad()``. With ``momentum=None`` PyTorch's update after batch k is
    ``running = running + (batch - running) / k``, so the result is exactly the mean of the
    per-batch means and the mean of the per-batch *unbiased* variances (each batch counts equally,
    whatever its size). Afterwards every module's momentum and training flag are restored;
    ``num_batches_tracked`` holds the number of batches averaged. Under an initialized
    ``torch.distributed`` process group the stats are averaged across ranks (weighted by batches).

    ``batches``: an iterable of tensors/arrays, ``(inputs, targets)`` tuples (the first element is
    fed) or dicts (fed as keyword arguments). ``device``: where batches are moved (default: the
    device of the model's first parameter or buffer); the model itself is not moved. BN modules the
    forward pass never reaches keep their old statistics (listed under ``"skipped"``). On any error
    the old statistics are put back and the model is left as it was.

    Returns ``{"num_batches", "num_samples", "world_size", "modules": [names], "skipped": {name:
    why}, "changes": {name: {"mean": max |new - old|, "var": max |new - old| / old}}}``.
    """
    _check_num_batches(num_batches)
    targets, skipped = _recalibration_targets(model)
    _check_data_length(batches, num_batches)
    if device is None:
        device = _model_device(model)
    saved = _SavedState(model, targets)
    ok = False
    try:
        with torch.no_grad():
            _start_precise_bn(model, targets)
            samples = _run_batches(model, batches, num_batches, device)
            world = _all_reduce_stats([m for _, m in targets])
            names, changes = _collect_changes(targets, saved, skipped)
        ok = True
    finally:
        saved.restore(put_back_stats=not ok)
    return {
        "num_batches": num_batches,
        "num_samples": samples,
        "world_size": world,
        "modules": names,
        "skipped": skipped,
        "changes": changes,
    }


def _check_num_batches(num_batches: Any) -> None:
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConverterError(f"num_batches must be a positive integer, got {num_batches!r}")


def _recalibration_targets(
    model: nn.Module,
) -> tuple[list[tuple[str, _BatchNorm]], dict[str, str]]:
    """The BN modules with running stats to recompute, and {name: why} for those without."""
    skipped: dict[str, str] = {}
    targets: list[tuple[str, _BatchNorm]] = []
    for name, m in model.named_modules():
        if not is_bn(m):
            continue
        if not m.track_running_stats or m.running_mean is None:
            skipped[name] = "track_running_stats=False (no running stats to recompute)"
        elif is_lazy(m.running_mean):
            raise ConverterError(
                f"module {name!r} is a lazy BatchNorm not yet materialized; run one forward pass "
                "first"
            )
        else:
            targets.append((name, m))
    if not targets:
        raise ConverterError(
            "the model has no BatchNorm module with running stats; nothing to recalibrate"
        )
    return targets, skipped


def _check_data_length(batches: Iterable[Any], num_batches: int) -> None:
    if hasattr(batches, "__len__"):
        have = len(batches)  # type: ignore[arg-type]
        if have < num_batches:
            raise ConverterError(
                f"the data holds {have} batches but num_batches={num_batches} were asked for"
            )


def _model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None when it has neither)."""
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return first.device if first is not None else None


class _SavedState:
    """What :func:`recalibrate` changes, kept to put back: every module's training flag and the
    recalibrated modules' momentum and running stats."""

    def __init__(self, model: nn.Module, targets: list[tuple[str, _BatchNorm]]) -> None:
        self.training = {m: m.training for m in model.modules()}
        self.momenta = {m: m.momentum for _, m in targets}
        self.stats = {m: _clone_stats(m) for _, m in targets}

    def put_back_stats(self, m: _BatchNorm) -> None:
        mean, var, nbt = self.stats[m]
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if nbt is not None and m.num_batches_tracked is not None:
            m.num_batches_tracked.copy_(nbt)

    def restore(self, put_back_stats: bool) -> None:
        """Momentum and training flags always; the running stats too when ``put_back_stats``."""
        with torch.no_grad():
            for m, momentum in self.momenta.items():
                m.__dict__.pop(RECALIBRATING_ATTR, None)
                m.momentum = momentum
                if put_back_stats:
                    self.put_back_stats(m)
            for m, flag in self.training.items():
                m.training = flag


def _clone_stats(m: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    nbt = m.num_batches_tracked
    return (
        m.running_mean.detach().clone(),
        m.running_var.detach().clone(),
        None if nbt is None else nbt.detach().clone(),
    )


def _start_precise_bn(model: nn.Module, targets: list[tuple[str, _BatchNorm]]) -> None:
    """Everything in eval mode but the targets: reset, cumulative average, train mode."""
    model.eval()
    for _, m in targets:
        m.reset_running_stats()
        m.momentum = None
        m.train()
        m.__dict__[RECALIBRATING_ATTR] = True


def _run_batches(
    model: nn.Module, batches: Iterable[Any], num_batches: int, device: torch.device | str | None
) -> int:
    """Feed ``num_batches`` batches through ``model``; returns the number of samples fed."""
    samples = 0
    it: Iterator[Any] = iter(batches)
    for i in range(num_batches):
        try:
            batch = next(it)
        except StopIteration:
            raise ConverterError(
                f"the data ran out after {i} batches; num_batches={num_batches} were asked for "
                "(give more data or a smaller number of batches)"
            ) from None
        batch = _batch_to(batch, device)
        samples += _batch_size(batch)
        _forward_checked(model, batch, i)
    return samples


def _forward_checked(model: nn.Module, batch: Any, i: int) -> None:
    """:func:`_forward`, with any failure but a ConverterError told as one line about the data."""
    try:
        _forward(model, batch)
    except ConverterError:
        raise
    except Exception as exc:
        shape = getattr(batch, "shape", None)
        raise ConverterError(
            f"forward pass on batch {i}{f' (shape {tuple(shape)})' if shape is not None else ''} "
            f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; is the "
            "data shaped and preprocessed as the model expects?"
        ) from exc


def _collect_changes(
    targets: list[tuple[str, _BatchNorm]], saved: _SavedState, skipped: dict[str, str]
) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The recalibrated module names and how far their stats moved; modules the forward pass
    never reached get their old stats back and an entry in ``skipped``."""
    changes: dict[str, dict[str, float]] = {}
    names: list[str] = []
    for name, m in targets:
        nbt = m.num_batches_tracked
        if nbt is not None and int(nbt) == 0:
            saved.put_back_stats(m)
            skipped[name] = "not reached by the forward pass (stats left as they were)"
            continue
        _check_finite(name, m)
        changes[name] = _change(m, saved.stats[m])
        names.append(name)
    return names, changes


def _check_finite(name: str, m: _BatchNorm) -> None:
    bad = [
        k
        for k, t in (("running_mean", m.running_mean), ("running_var", m.running_var))
        if not torch.isfinite(t).all()
    ]
    if bad:
        raise InvalidTensorError(
            f"module {name!r}: recalibrated {' and '.join(bad)} hold NaN/inf; the data holds "
            "NaN/inf or overflows the model (old stats kept)"
        )


def _change(m: _BatchNorm, old: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """max |new - old| of running_mean; max |new - old| / |old| of running_var."""
    old_mean, old_var = old[0].double(), old[1].double()
    dmean = (m.running_mean.double() - old_mean).abs().max().item()
    dvar = ((m.running_var.double() - old_var).abs() / old_var.abs().clamp_min(1e-12)).max().item()
    return {"mean": dmean, "var": dvar}


def _all_reduce_stats(mods: list[_BatchNorm]) -> int:
    """Average running stats across ranks, weighted by each rank's batch count; returns world
    size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    world = dist.get_world_size()
    if world == 1:
        return 1
    for m in mods:
        n = m.num_batches_tracked.detach().to(m.running_mean.dtype)
        mean = m.running_mean * n
        var = m.running_var * n
        total = n.clone().reshape(1)
        for t in (mean, var, total):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if float(total) > 0:
            m.running_mean.copy_(mean / total)
            m.running_var.copy_(var / total)
        m.num_batches_tracked.fill_(int(round(float(total))))
    return world


def recalibrate_checkpoint(
    src: str | Path,
    data_path: str | Path,
    out: str | Path,
    *,
    num_batches: int,
    batch_size: int,
    key: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
    device: str = "cpu",
    force: bool = False,
) -> dict[str, Any]:
    """Recalibrate the BN statistics of a checkpoint ckptport wrote and write ``out`` (atomically;
    the input is never modified). Returns ``recalibrate``'s result plus ``input``/``output``."""
    from ..data import iter_batches
    from ..formats import write_checkpoint
    from ..model import load_model

    src, out = Path(src), Path(out)
    _check_paths(src, out, force)
    data = _enough_data(data_path, key, num_batches, batch_size)
    _check_device(device)
    model = load_model(src, device=device)
    batches = iter_batches(data, num_batches, batch_size, shuffle, seed, _float_dtype(model))
    result = recalibrate(model, batches, num_batches, device=device)
    meta = dict(getattr(model, "ckptport_metadata", None) or {})
    meta["recalibrated"] = json.dumps(
        {
            "method": "precise BN: mean of per-batch means and unbiased variances",
            "data": data.path.name,
            "num_batches": num_batches,
            "batch_size": batch_size,
            "num_samples": result["num_samples"],
            "shuffle": shuffle,
            "seed": seed,
            "modules": len(result["modules"]),
            "skipped": result["skipped"],
        },
        sort_keys=True,
    )
    written = write_checkpoint(out, model.state_dict(), meta, force=force, inputs=(src,))
    return {"input": str(src), "output": str(written), **result}


def _check_paths(src: Path, out: Path, force: bool) -> None:
    """The input exists; the output passes the one output policy (checked before the long work)."""
    from ..formats import check_output

    if not src.is_file():
        raise SourceFormatError(f"{src}: no such checkpoint file")
    check_output(out, force, (src,))


def _enough_data(data_path: str | Path, key: str | None, num_batches: int, batch_size: int) -> Any:
    """The array data at ``data_path``, checked to hold ``num_batches`` full batches."""
    from ..data import ArrayData

    data = ArrayData(data_path, key)
    need = num_batches * batch_size
    if data.size < need:
        raise ConverterError(
            f"--data {data.path} holds {data.size} samples = {data.size // batch_size} full "
            f"batches of {batch_size}, but --num-batches {num_batches} needs {need} samples; give "
            "more data or lower --num-batches/--batch-size"
        )
    return data


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConverterError(
            f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConverterError(
            f"--device {device}: no CUDA device is available here; use --device cpu"
        )


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    return params[0].dtype if params else torch.float32
