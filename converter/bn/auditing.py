"""Audit a model for BatchNorm mistakes: the rules, :func:`audit`, and :func:`audit_target` for a
model spec or a checkpoint ckptport wrote."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ..errors import ConverterError, SourceFormatError
from ..specs import SPEC_FORMS, SpecError, parse_spec
from ..registry import Registry
from .common import bn_modules, is_bn
from .freezing import is_frozen

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
    """An audit rule: ``check(ctx)`` returns ``(message, fix)`` when the module breaks it, else
    None."""

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


@_rule(
    "momentum-keras-convention", "error", "momentum > 0.5: a Keras/TF momentum pasted into PyTorch"
)
def _r_momentum_keras(ctx: _Ctx) -> tuple[str, str] | None:
    m = getattr(ctx.module, "momentum", None) if is_bn(ctx.module) else None
    if isinstance(m, (int, float)) and 0.5 < m <= 1.0:
        return (
            (
                f"momentum={_fmt(m)} looks like the Keras/TF convention (weight of the old value); "
                "PyTorch's momentum weighs the new batch, so every train-mode batch moves the "
                f"running stats {m:.0%} of the way to that batch's statistics (torchvision MaxViT "
                "shipped 0.99 until vision #8250)"
            ),
            (
                f"set momentum={_fmt(1.0 - m)} (= 1 - {_fmt(m)}); "
                f"converter.bn.momentum_from_keras({_fmt(m)})"
            ),
        )
    return None


@_rule("momentum-out-of-range", "error", "momentum outside [0, 1]")
def _r_momentum_range(ctx: _Ctx) -> tuple[str, str] | None:
    if not is_bn(ctx.module):
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
    if is_bn(ctx.module) and ctx.module.track_running_stats and ctx.module.momentum is None:
        return (
            (
                "momentum=None: running stats are the cumulative average over every train-mode"
                " batch since num_batches_tracked was 0; fine for precise BN, surprising for"
                " fine-tuning"
            ),
            (
                "set a momentum (e.g. 0.1, or 1 - Keras momentum) unless a cumulative average is "
                "intended"
            ),
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
            (
                f"eps={_fmt(eps)} but the source layer used eps={_fmt(src_eps)}; outputs differ"
                " most on low-variance channels"
            ),
            (
                f"set eps={_fmt(src_eps)} on this module (load with converter.load_model, which "
                "applies it)"
            ),
        )
    return None


@_rule("no-running-stats", "warning", "track_running_stats=False")
def _r_no_stats(ctx: _Ctx) -> tuple[str, str] | None:
    if not is_bn(ctx.module) or ctx.module.track_running_stats:
        return None
    if ctx.module.running_mean is None:
        why = (
            "track_running_stats=False: eval normalizes each batch with its own statistics, so a "
            "sample's output depends on the other samples in its batch (and batch size 1 breaks)"
        )
    else:
        why = (
            "track_running_stats=False set after construction: the buffers still exist and eval "
            "uses them, but train-mode passes never update them"
        )
    return why, "build the module with track_running_stats=True and load running_mean/running_var"


@_rule("affine-missing", "warning", "affine=False where the source had scale/center")
def _r_affine(ctx: _Ctx) -> tuple[str, str] | None:
    src = ctx.source
    if not src or not is_bn(ctx.module) or ctx.module.affine:
        return None
    had = [k for k in ("scale", "center") if src.get(k, src.get("affine", False))]
    if had:
        return (
            (
                f"affine=False but the source layer had {' and '.join(had)}=True: its learned "
                f"{'gamma' if 'scale' in had else 'beta'} has nowhere to go"
            ),
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
            (
                f"running_var has {n} of {var.numel()} channels <= 0 (min "
                f"{_fmt(float(var[bad].min()))}); a variance cannot be negative, and 0 divides by "
                "sqrt(eps) alone: the checkpoint is damaged or mis-mapped"
            ),
            "re-convert from the source, or recompute the stats: ckptport recalibrate",
        )
    return None


@_rule("running-stats-nonfinite", "error", "NaN or inf in running stats")
def _r_finite(ctx: _Ctx) -> tuple[str, str] | None:
    st = _stats(ctx.module)
    if st is None:
        return None
    parts = [
        f"{name} has {int((~torch.isfinite(t)).sum())} NaN/inf"
        for name, t in zip(("running_mean", "running_var"), st)
        if not torch.isfinite(t).all()
    ]
    if parts:
        return (
            "; ".join(parts) + ": every output through this module is NaN/inf in eval",
            "re-convert from the source, or recompute the stats: ckptport recalibrate",
        )
    return None


@_rule("train-mode", "warning", "BN in train mode in a model meant for inference")
def _r_train(ctx: _Ctx) -> tuple[str, str] | None:
    if (
        not ctx.expect_eval
        or not is_bn(ctx.module)
        or not ctx.module.training
        or is_frozen(ctx.module)
    ):
        return None
    return (
        (
            "in train mode: inference would normalize with batch statistics and overwrite the "
            "running stats"
        ),
        "call model.eval() before inference (or converter.bn.freeze(model) for fine-tuning)",
    )


@_rule("nbt-stats-never-updated", "warning", "num_batches_tracked > 0 but stats at init")
def _r_nbt_init(ctx: _Ctx) -> tuple[str, str] | None:
    if not is_bn(ctx.module):
        return None
    n, st = _nbt(ctx.module), _stats(ctx.module)
    if n is None or st is None or n <= 0 or not _at_init(st):
        return None
    return (
        (
            f"num_batches_tracked={n} but running_mean is all 0 and running_var all 1 (their"
            " initial values): batches were counted but the statistics never loaded or updated"
        ),
        (
            "load the real running_mean/running_var (check the key mapping), or recompute: ckptport"
            " recalibrate"
        ),
    )


@_rule(
    "nbt-zero-cumulative", "warning", "num_batches_tracked == 0 with momentum None, stats loaded"
)
def _r_nbt_zero(ctx: _Ctx) -> tuple[str, str] | None:
    if (
        not is_bn(ctx.module)
        or ctx.module.momentum is not None
        or not ctx.module.track_running_stats
    ):
        return None
    n, st = _nbt(ctx.module), _stats(ctx.module)
    if n != 0 or st is None or _at_init(st):
        return None
    return (
        (
            "momentum=None with num_batches_tracked=0 while the running stats hold real values: the"
            " first train-mode batch gets weight 1/1 and overwrites them"
        ),
        (
            "set a momentum (e.g. 1 - Keras momentum), or set num_batches_tracked to the number of "
            "batches the stats average"
        ),
    )


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
    """Result of :func:`audit_target`: the findings, the target string and how many modules were
    checked."""

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


# --------------------------------------------------------------------------------------------------
# Checkpoints ckptport wrote
# --------------------------------------------------------------------------------------------------


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """Our checkpoint as a model (via converter.model.load_model) plus its recorded source BN
    config."""
    from .. import model as model_mod  # lazy: written by the lead, imports the torch side

    load_model = getattr(model_mod, "load_model", None)
    if load_model is None:  # pragma: no cover - only before converter.model grows load_model
        raise ConverterError(
            f"{path}: this build cannot load checkpoints (converter.model.load_model missing)"
        )
    model = load_model(path)
    meta = getattr(model, "ckptport_metadata", None)
    if meta is None:  # pragma: no cover - load_model attaches it
        from .. import formats

        meta = formats.read(path).metadata
    return model, source_bn_from_metadata(meta, path)


def source_bn_from_metadata(
    meta: Mapping[str, str], path: Any = "checkpoint"
) -> dict[str, dict[str, Any]]:
    """The per-module source BN config recorded in our checkpoint metadata (``bn_config`` JSON:
    ``{module: {"eps", "momentum", "keras_momentum", "center", "scale", ...}}``); {} when absent."""
    raw = meta.get("bn_config")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as exc:
        raise SourceFormatError(
            f"{path}: metadata bn_config is not valid JSON ({exc}); re-convert the file"
        ) from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SourceFormatError(
            f"{path}: metadata bn_config is not a {{module: {{...}}}} mapping; re-convert the file"
        )
    return data


# --------------------------------------------------------------------------------------------------
# Audit targets: model specs and checkpoints
# --------------------------------------------------------------------------------------------------

_CKPT_SUFFIXES = (".safetensors", ".pt", ".pth")


def resolve_model_spec(spec: str) -> nn.Module:
    """Build a model from a spec (``torchvision:NAME``, ``timm:NAME``, ``path/to/file.py:factory``,
    ``package.module:factory``; parsed by :func:`converter.specs.parse_spec`) with random weights
    (nothing is downloaded), in eval mode."""
    from ..model import build_target

    return build_target(parse_spec(spec)).eval()


def audit_target(target: str, *, expect_eval: bool = True) -> AuditReport:
    """Audit a model spec (see :func:`resolve_model_spec`) or a checkpoint ckptport wrote.

    A spec is built with random weights in eval mode. A checkpoint is loaded with
    ``converter.model.load_model`` (eval mode, recorded BN momentum/eps applied) and its recorded
    source BN config (``bn_config`` metadata) feeds the eps/affine rules.
    """
    if target.endswith(_CKPT_SUFFIXES):
        path = Path(target)
        if not path.is_file():
            raise SourceFormatError(f"{path}: no such file")
        model, source_bn = _load_checkpoint(path)
        findings = audit(model, source_bn, expect_eval=expect_eval)
        return AuditReport(target, findings, len(bn_modules(model)), "checkpoint")
    try:
        spec = parse_spec(target)
    except SpecError:
        if ":" in target:
            raise  # it meant to be a spec: the parser's message says what is wrong with it
        raise ConverterError(
            f"cannot audit {target!r}: give a model spec ({SPEC_FORMS}) or a checkpoint ckptport "
            f"wrote ({'/'.join(_CKPT_SUFFIXES)})"
        ) from None
    model = resolve_model_spec(spec.text)
    return AuditReport(
        target, audit(model, expect_eval=expect_eval), len(bn_modules(model)), "spec"
    )
