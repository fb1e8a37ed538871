"""The BatchNorm toolkit: audit a model for BN mistakes, recompute running statistics (precise BN),
freeze BN through ``model.train()``, and convert momentum between the Keras and PyTorch conventions.

Momentum conventions (see ``docs/batchnorm.md``)::

    Keras/TF:  moving  = m * moving  + (1 - m) * batch      (default m = 0.99)
    PyTorch:   running = (1 - p) * running + p * batch      (default p = 0.1)
    p = 1 - m

Everything here is silent (no prints) and raises :class:`converter.errors.ConverterError` subclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parameter import is_lazy

from .errors import ConverterError, InvalidTensorError, SourceFormatError
from .registry import Registry

__all__ = [
    "SEVERITIES",
    "RULES",
    "Rule",
    "Finding",
    "AuditReport",
    "audit",
    "audit_target",
    "bn_modules",
    "severity_at_least",
    "resolve_model_spec",
    "SPEC_FORMS",
    "recalibrate",
    "freeze",
    "unfreeze",
    "is_frozen",
    "momentum_from_keras",
    "momentum_to_keras",
    "from_keras",
    "to_keras",
]

# --------------------------------------------------------------------------------------------------
# Momentum conventions
# --------------------------------------------------------------------------------------------------


def _check_momentum(value: Any, convention: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConverterError(f"{convention} momentum must be a number in (0, 1), got {value!r}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ConverterError(f"{convention} momentum must be in (0, 1) (exclusive), got {value!r}")
    return value


def _complement(value: float) -> float:
    # 1 - 0.99 is 0.010000000000000009 in binary floating point; keep 12 significant digits so the
    # value reads as the 0.01 everyone means (a relative change below 1e-12).
    return float(f"{1.0 - value:.12g}")


def momentum_from_keras(m: float) -> float:
    """PyTorch BN momentum for a Keras/TF momentum ``m``: ``1 - m`` (Keras 0.99 -> PyTorch 0.01).

    Raises ConverterError unless ``0 < m < 1``.
    """
    return _complement(_check_momentum(m, "Keras"))


def momentum_to_keras(p: float) -> float:
    """Keras/TF BN momentum for a PyTorch momentum ``p``: ``1 - p`` (PyTorch 0.1 -> Keras 0.9).

    Raises ConverterError unless ``0 < p < 1`` (PyTorch's ``momentum=None``, a cumulative average,
    has no Keras equivalent).
    """
    if p is None:
        raise ConverterError(
            "PyTorch momentum=None (cumulative average) has no Keras equivalent; pick a momentum in (0, 1)"
        )
    return _complement(_check_momentum(p, "PyTorch"))


from_keras = momentum_from_keras
to_keras = momentum_to_keras

# --------------------------------------------------------------------------------------------------
# Audit
# --------------------------------------------------------------------------------------------------

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")


def severity_at_least(severity: str, threshold: str) -> bool:
    """True when ``severity`` is at or above ``threshold`` (info < warning < error)."""
    for s in (severity, threshold):
        if s not in SEVERITIES:
            raise ConverterError(f"unknown severity {s!r}; valid: {', '.join(SEVERITIES)}")
    return SEVERITIES.index(severity) >= SEVERITIES.index(threshold)


@dataclass(frozen=True)
class Finding:
    """One problem found by :func:`audit`: the rule id, its severity, the module path, why it
    matters (``message``) and what to do (``fix``)."""

    rule: str
    severity: str
    module: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclass
class _Ctx:
    """What a rule sees: one module, its path, and the audit's options."""

    name: str
    module: nn.Module
    source: Mapping[str, Any] | None
    expect_eval: bool


@dataclass(frozen=True)
class Rule:
    """An audit rule: ``check(ctx)`` returns ``(message, fix)`` when the module breaks it, else None."""

    id: str
    severity: str
    summary: str
    check: Callable[[_Ctx], tuple[str, str] | None]


RULES: Registry[Rule] = Registry("audit rule")


def _rule(rule_id: str, severity: str, summary: str) -> Callable[[Callable], Callable]:
    if severity not in SEVERITIES:  # pragma: no cover - programming error
        raise ConverterError(f"rule {rule_id}: unknown severity {severity!r}")

    def deco(fn: Callable[[_Ctx], tuple[str, str] | None]) -> Callable:
        RULES.add(rule_id, Rule(rule_id, severity, summary, fn))
        return fn

    return deco


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def _is_frozen_bn_like(module: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d and look-alikes: running stats as buffers, no _BatchNorm."""
    return (
        not isinstance(module, nn.modules.batchnorm._NormBase)
        and "FrozenBatchNorm" in type(module).__name__
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    )


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules :func:`audit` checks: every ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm,
    LazyBatchNorm*, timm's BatchNormAct2d, ...) and FrozenBatchNorm2d look-alikes."""
    return [(n, m) for n, m in model.named_modules() if _is_bn(m) or _is_frozen_bn_like(m)]


def _stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """running_mean/var as float64 on CPU, or None when absent, lazy or on the meta device."""
    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    if is_lazy(mean) or is_lazy(var) or mean.is_meta or var.is_meta:
        return None
    return mean.detach().double().cpu(), var.detach().double().cpu()


def _at_init(stats: tuple[torch.Tensor, torch.Tensor]) -> bool:
    mean, var = stats
    return bool((mean == 0).all() and (var == 1).all())


def _nbt(module: nn.Module) -> int | None:
    t = getattr(module, "num_batches_tracked", None)
    if not isinstance(t, torch.Tensor) or is_lazy(t) or t.is_meta or t.numel() != 1:
        return None
    return int(t.item())


def _fmt(x: float) -> str:
    return f"{x:.6g}"


@_rule("momentum-keras-convention", "error", "momentum > 0.5: a Keras/TF momentum pasted into PyTorch")
def _r_momentum_keras(ctx: _Ctx) -> tuple[str, str] | None:
    m = getattr(ctx.module, "momentum", None) if _is_bn(ctx.module) else None
    if isinstance(m, (int, float)) and 0.5 < m <= 1.0:
        return (
            f"momentum={_fmt(m)} looks like the Keras/TF convention (weight of the old value); PyTorch's "
            f"momentum weighs the new batch, so every train-mode batch moves the running stats "
            f"{m:.0%} of the way to that batch's statistics (torchvision MaxViT shipped 0.99 until vision #8250)",
            f"set momentum={_fmt(1.0 - m)} (= 1 - {_fmt(m)}); converter.bn.momentum_from_keras({_fmt(m)})",
        )
    return None


@_rule("momentum-out-of-range", "error", "momentum outside [0, 1]")
def _r_momentum_range(ctx: _Ctx) -> tuple[str, str] | None:
    if not _is_bn(ctx.module):
        return None
    m = ctx.module.momentum
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (0.0 <= m <= 1.0):
        return (
            f"momentum={m!r} is not in [0, 1]; the running-stat update is no longer an average",
            "set a momentum in (0, 1) (PyTorch default 0.1; from Keras m use 1 - m)",
        )
    return None


@_rule("momentum-cumulative", "info", "momentum None: cumulative average")
def _r_momentum_none(ctx: _Ctx) -> tuple[str, str] | None:
    if _is_bn(ctx.module) and ctx.module.track_running_stats and ctx.module.momentum is None:
        return (
            "momentum=None: running stats are the cumulative average over every train-mode batch since "
            "num_batches_tracked was 0; fine for precise BN, surprising for fine-tuning",
            "set a momentum (e.g. 0.1, or 1 - Keras momentum) unless a cumulative average is intended",
        )
    return None


@_rule("eps-mismatch", "warning", "eps differs from the source checkpoint's")
def _r_eps(ctx: _Ctx) -> tuple[str, str] | None:
    src = ctx.source
    eps = getattr(ctx.module, "eps", None)
    if not src or eps is None:
        return None
    src_eps = src.get("eps", src.get("epsilon"))
    if src_eps is None:
        return None
    if not math.isclose(float(eps), float(src_eps), rel_tol=1e-6, abs_tol=0.0):
        return (
            f"eps={_fmt(eps)} but the source layer used eps={_fmt(src_eps)}; outputs differ most on "
            "low-variance channels",
            f"set eps={_fmt(src_eps)} on this module (load with converter.load_model, which applies it)",
        )
    return None


@_rule("no-running-stats", "warning", "track_running_stats=False")
def _r_no_stats(ctx: _Ctx) -> tuple[str, str] | None:
    if not _is_bn(ctx.module) or ctx.module.track_running_stats:
        return None
    if ctx.module.running_mean is None:
        why = (
            "track_running_stats=False: eval normalizes each batch with its own statistics, so a sample's "
            "output depends on the other samples in its batch (and batch size 1 breaks)"
        )
    else:
        why = (
            "track_running_stats=False set after construction: the buffers still exist and eval uses "
            "them, but train-mode passes never update them"
        )
    return why, "build the module with track_running_stats=True and load running_mean/running_var"


@_rule("affine-missing", "warning", "affine=False where the source had scale/center")
def _r_affine(ctx: _Ctx) -> tuple[str, str] | None:
    src = ctx.source
    if not src or not _is_bn(ctx.module) or ctx.module.affine:
        return None
    had = [k for k in ("scale", "center") if src.get(k, src.get("affine", False))]
    if had:
        return (
            f"affine=False but the source layer had {' and '.join(had)}=True: its learned "
            f"{'gamma' if 'scale' in had else 'beta'} has nowhere to go",
            "build the module with affine=True and load weight (gamma) and bias (beta)",
        )
    return None


@_rule("running-var-nonpositive", "error", "running_var <= 0")
def _r_var(ctx: _Ctx) -> tuple[str, str] | None:
    st = _stats(ctx.module)
    if st is None:
        return None
    var = st[1]
    bad = torch.isfinite(var) & (var <= 0)
    if bad.any():
        n = int(bad.sum())
        return (
            f"running_var has {n} of {var.numel()} channels <= 0 (min {_fmt(float(var[bad].min()))}); a variance "
            "cannot be negative, and 0 divides by sqrt(eps) alone: the checkpoint is damaged or mis-mapped",
            "re-convert from the source, or recompute the stats: ckptport recalibrate",
        )
    return None


@_rule("running-stats-nonfinite", "error", "NaN or inf in running stats")
def _r_finite(ctx: _Ctx) -> tuple[str, str] | None:
    st = _stats(ctx.module)
    if st is None:
        return None
    parts = [f"{name} has {int((~torch.isfinite(t)).sum())} NaN/inf" for name, t in
             zip(("running_mean", "running_var"), st) if not torch.isfinite(t).all()]
    if parts:
        return (
            "; ".join(parts) + ": every output through this module is NaN/inf in eval",
            "re-convert from the source, or recompute the stats: ckptport recalibrate",
        )
    return None


@_rule("train-mode", "warning", "BN in train mode in a model meant for inference")
def _r_train(ctx: _Ctx) -> tuple[str, str] | None:
    if not ctx.expect_eval or not _is_bn(ctx.module) or not ctx.module.training or is_frozen(ctx.module):
        return None
    return (
        "in train mode: inference would normalize with batch statistics and overwrite the running stats",
        "call model.eval() before inference (or converter.bn.freeze(model) for fine-tuning)",
    )


@_rule("nbt-stats-never-updated", "warning", "num_batches_tracked > 0 but stats at init")
def _r_nbt_init(ctx: _Ctx) -> tuple[str, str] | None:
    if not _is_bn(ctx.module):
        return None
    n, st = _nbt(ctx.module), _stats(ctx.module)
    if n is None or st is None or n <= 0 or not _at_init(st):
        return None
    return (
        f"num_batches_tracked={n} but running_mean is all 0 and running_var all 1 (their initial values): "
        "batches were counted but the statistics never loaded or updated",
        "load the real running_mean/running_var (check the key mapping), or recompute: ckptport recalibrate",
    )


@_rule("nbt-zero-cumulative", "warning", "num_batches_tracked == 0 with momentum None, stats loaded")
def _r_nbt_zero(ctx: _Ctx) -> tuple[str, str] | None:
    if not _is_bn(ctx.module) or ctx.module.momentum is not None or not ctx.module.track_running_stats:
        return None
    n, st = _nbt(ctx.module), _stats(ctx.module)
    if n != 0 or st is None or _at_init(st):
        return None
    return (
        "momentum=None with num_batches_tracked=0 while the running stats hold real values: the first "
        "train-mode batch gets weight 1/1 and overwrites them",
        "set a momentum (e.g. 1 - Keras momentum), or set num_batches_tracked to the number of batches "
        "the stats average",
    )


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` was frozen by :func:`freeze`."""
    return _FROZEN_ATTR in module.__dict__


def audit(
    model: nn.Module,
    source_bn: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    expect_eval: bool = True,
    rules: Iterable[str] | None = None,
) -> list[Finding]:
    """Check every BatchNorm module of ``model`` against the rules in :data:`RULES`.

    ``source_bn`` maps a module path to what the source layer recorded (``eps``, ``scale``,
    ``center``; our checkpoints carry it as the ``bn_config`` metadata), enabling the eps and affine
    rules. ``expect_eval``: the model is meant for inference, so BN modules in train mode are a
    finding. ``rules`` limits the check to those rule ids. Findings come sorted by module order,
    then rule. The model is not modified.
    """
    chosen = [RULES.get(r) for r in rules] if rules is not None else [r for _, r in RULES.items()]
    source_bn = source_bn or {}
    findings: list[Finding] = []
    for name, module in bn_modules(model):
        ctx = _Ctx(name, module, source_bn.get(name), expect_eval)
        for rule in chosen:
            hit = rule.check(ctx)
            if hit is not None:
                findings.append(Finding(rule.id, rule.severity, name, hit[0], hit[1]))
    return findings


@dataclass
class AuditReport:
    """Result of :func:`audit_target`: the findings, the target string and how many modules were checked."""

    target: str
    findings: list[Finding]
    modules_checked: int
    kind: str  # "spec" or "checkpoint"

    def worst(self) -> str | None:
        """Highest severity among the findings, or None when clean."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def fails(self, threshold: str) -> bool:
        """True when a finding is at or above ``threshold``."""
        return any(severity_at_least(f.severity, threshold) for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "findings": [f.to_dict() for f in self.findings],
            "target": self.target,
            "modules_checked": self.modules_checked,
        }


_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _is_spec(target: str) -> bool:
    lib, sep, _ = target.partition(":")
    if sep and lib in ("torchvision", "timm"):
        return True
    left, sep, right = target.rpartition(":")
    return bool(sep) and left.endswith(".py") and bool(right)


def audit_target(target: str, *, expect_eval: bool = True) -> AuditReport:
    """Audit a model spec (see :func:`resolve_model_spec`) or a checkpoint ckptport wrote.

    A spec is built with random weights in eval mode. A checkpoint is loaded with
    ``converter.model.load_model`` (eval mode, recorded BN momentum/eps applied) and its recorded
    source BN config (``bn_config`` metadata) feeds the eps/affine rules.
    """
    if _is_spec(target):
        model = resolve_model_spec(target)
        return AuditReport(target, audit(model, expect_eval=expect_eval), len(bn_modules(model)), "spec")
    if target.endswith(_CKPT_SUFFIXES):
        path = Path(target)
        if not path.is_file():
            raise SourceFormatError(f"{path}: no such file")
        model, source_bn = _load_checkpoint(path)
        findings = audit(model, source_bn, expect_eval=expect_eval)
        return AuditReport(target, findings, len(bn_modules(model)), "checkpoint")
    raise ConverterError(
        f"cannot audit {target!r}: give a model spec ({SPEC_FORMS}) or a checkpoint ckptport wrote "
        f"({'/'.join(_CKPT_SUFFIXES)})"
    )


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Our checkpoint as a model (via converter.model.load_model) plus its recorded source BN config."""
    from . import model as model_mod  # lazy: written by the lead, imports the torch side

    load_model = getattr(model_mod, "load_model", None)
    if load_model is None:  # pragma: no cover - only before converter.model grows load_model
        raise ConverterError(f"{path}: this build cannot load checkpoints (converter.model.load_model missing)")
    model = load_model(path)
    meta = getattr(model, "ckptport_metadata", None)
    if meta is None:  # pragma: no cover - load_model attaches it
        from . import formats

        meta = formats.read(path).metadata
    return model, source_bn_from_metadata(meta, path)


def source_bn_from_metadata(meta: Mapping[str, str], path: Any = "checkpoint") -> dict[str, dict[str, Any]]:
    """The per-module source BN config recorded in our checkpoint metadata (``bn_config`` JSON:
    ``{module: {"eps", "momentum", "keras_momentum", "center", "scale", ...}}``); {} when absent."""
    raw = meta.get("bn_config")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise SourceFormatError(f"{path}: metadata bn_config is not valid JSON ({exc}); re-convert the file") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SourceFormatError(f"{path}: metadata bn_config is not a {{module: {{...}}}} mapping; re-convert the file")
    return data


# --------------------------------------------------------------------------------------------------
# Model specs
# --------------------------------------------------------------------------------------------------

from .model import SPEC_FORMS  # noqa: E402


def resolve_model_spec(spec: str) -> nn.Module:
    """Build a model from a spec (``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory``,
    ``package.module:factory``) with random weights (nothing is downloaded), in eval mode."""
    from .model import build_target

    if not isinstance(spec, str) or not spec:
        raise ConverterError(f"model spec {spec!r} is not one of {SPEC_FORMS}")
    return build_target(spec).eval()


# --------------------------------------------------------------------------------------------------
# Precise BN
# --------------------------------------------------------------------------------------------------


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
    device of the model's first parameter or buffer); the model itself is not moved. BN modules the forward pass never reaches keep their old statistics (listed under
    ``"skipped"``). On any error the old statistics are put back and the model is left as it was.

    Returns ``{"num_batches", "num_samples", "world_size", "modules": [names], "skipped": {name:
    why}, "changes": {name: {"mean": max |new - old|, "var": max |new - old| / old}}}``.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConverterError(f"num_batches must be a positive integer, got {num_batches!r}")
    skipped: dict[str, str] = {}
    targets: list[tuple[str, _BatchNorm]] = []
    for name, m in model.named_modules():
        if not _is_bn(m):
            continue
        if not m.track_running_stats or m.running_mean is None:
            skipped[name] = "track_running_stats=False (no running stats to recompute)"
        elif is_lazy(m.running_mean):
            raise ConverterError(f"module {name!r} is a lazy BatchNorm not yet materialized; run one forward pass first")
        else:
            targets.append((name, m))
    if not targets:
        raise ConverterError("the model has no BatchNorm module with running stats; nothing to recalibrate")
    if hasattr(batches, "__len__"):
        have = len(batches)  # type: ignore[arg-type]
        if have < num_batches:
            raise ConverterError(f"the data holds {have} batches but num_batches={num_batches} were asked for")

    if device is None:
        first = next(iter(model.parameters()), None)
        if first is None:
            first = next(iter(model.buffers()), None)
        device = first.device if first is not None else None
    training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for _, m in targets}
    saved = {m: (m.running_mean.detach().clone(), m.running_var.detach().clone(),
                 None if m.num_batches_tracked is None else m.num_batches_tracked.detach().clone())
             for _, m in targets}

    def put_back(m: _BatchNorm) -> None:
        mean, var, nbt = saved[m]
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        if nbt is not None and m.num_batches_tracked is not None:
            m.num_batches_tracked.copy_(nbt)

    ok = False
    samples = 0
    world = 1
    try:
        with torch.no_grad():
            model.eval()
            for _, m in targets:
                m.reset_running_stats()
                m.momentum = None
                m.train()
                m.__dict__[_RECAL_ATTR] = True
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
                try:
                    _forward(model, batch)
                except ConverterError:
                    raise
                except Exception as exc:
                    shape = getattr(batch, "shape", None)
                    raise ConverterError(
                        f"forward pass on batch {i}{f' (shape {tuple(shape)})' if shape is not None else ''} "
                        f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                        "is the data shaped and preprocessed as the model expects?"
                    ) from exc
            world = _all_reduce_stats([m for _, m in targets])
            changes: dict[str, dict[str, float]] = {}
            names: list[str] = []
            for name, m in targets:
                nbt = m.num_batches_tracked
                if nbt is not None and int(nbt) == 0:
                    put_back(m)
                    skipped[name] = "not reached by the forward pass (stats left as they were)"
                    continue
                bad = [k for k, t in (("running_mean", m.running_mean), ("running_var", m.running_var))
                       if not torch.isfinite(t).all()]
                if bad:
                    raise InvalidTensorError(
                        f"module {name!r}: recalibrated {' and '.join(bad)} hold NaN/inf; the data holds "
                        "NaN/inf or overflows the model (old stats kept)"
                    )
                old_mean, old_var, _ = saved[m]
                dmean = (m.running_mean.double() - old_mean.double()).abs().max().item()
                dvar = ((m.running_var.double() - old_var.double()).abs()
                        / old_var.double().abs().clamp_min(1e-12)).max().item()
                changes[name] = {"mean": dmean, "var": dvar}
                names.append(name)
        ok = True
    finally:
        with torch.no_grad():
            for _, m in targets:
                m.__dict__.pop(_RECAL_ATTR, None)
                m.momentum = momenta[m]
                if not ok:
                    put_back(m)
            for m, flag in training.items():
                m.training = flag
    return {
        "num_batches": num_batches,
        "num_samples": samples,
        "world_size": world,
        "modules": names,
        "skipped": skipped,
        "changes": changes,
    }


def _all_reduce_stats(mods: list[_BatchNorm]) -> int:
    """Average running stats across ranks, weighted by each rank's batch count; returns world size."""
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


# --------------------------------------------------------------------------------------------------
# Freezing
# --------------------------------------------------------------------------------------------------

_FROZEN_ATTR = "_ckptport_bn_frozen"
_RECAL_ATTR = "_ckptport_bn_recalibrating"


def _frozen_pre_hook(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a frozen BN: always run in eval mode (use, never update, running stats)."""
    if module.training and not module.__dict__.get(_RECAL_ATTR, False):
        module.training = False


def freeze(model: nn.Module) -> nn.Module:
    """Freeze every BatchNorm module of ``model``: running statistics and affine parameters stay
    fixed, even through ``model.train()``.

    Each BN module is put in eval mode and gets a forward pre-hook that switches it back to eval
    before every forward, so ``model.train()`` (which sets ``training=True`` on it) cannot make it
    normalize with batch statistics or update its running stats. ``weight``/``bias`` get
    ``requires_grad=False`` (their old flags are restored by :func:`unfreeze`). The hook is a
    module-level function, so frozen models survive ``copy.deepcopy`` and pickling. Idempotent;
    returns ``model``. :func:`recalibrate` still recomputes frozen modules' statistics.
    """
    for _, m in model.named_modules():
        if not _is_bn(m) or is_frozen(m):
            continue
        flags = {p: getattr(m, p).requires_grad for p in ("weight", "bias") if isinstance(getattr(m, p, None), nn.Parameter)}
        for p in flags:
            getattr(m, p).requires_grad_(False)
        m.register_forward_pre_hook(_frozen_pre_hook)
        m.__dict__[_FROZEN_ATTR] = flags
        m.training = False
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze`: remove the hook, restore ``requires_grad`` and set each BN module's
    training flag to that of ``model``. Returns ``model``."""
    for _, m in model.named_modules():
        if not is_frozen(m):
            continue
        flags = m.__dict__.pop(_FROZEN_ATTR)
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _frozen_pre_hook]:
            del m._forward_pre_hooks[key]
        for p, flag in flags.items():
            param = getattr(m, p, None)
            if isinstance(param, nn.Parameter):
                param.requires_grad_(flag)
        m.training = model.training
    return model


def recalibrate_checkpoint(src: str | Path, data_path: str | Path, out: str | Path, *, num_batches: int,
                           batch_size: int, key: str | None = None, shuffle: bool = True, seed: int = 0,
                           device: str = "cpu", force: bool = False) -> dict[str, Any]:
    """Recalibrate the BN statistics of a checkpoint ckptport wrote and write ``out`` (atomically;
    the input is never modified). Returns ``recalibrate``'s result plus ``input``/``output``."""
    from .data import ArrayData, iter_batches
    from .errors import OutputExistsError
    from .formats import write_checkpoint
    from .model import load_model

    src, out = Path(src), Path(out)
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
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConverterError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConverterError(f"--device {device}: no CUDA device is available here; use --device cpu")
    model = load_model(src, device=device)
    params = [p for p in model.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.float32
    result = recalibrate(model, iter_batches(data, num_batches, batch_size, shuffle, seed, dtype), num_batches,
                         device=device)
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
    return {"input": str(src), "output": str(written), **result}
