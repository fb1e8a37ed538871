"""The BatchNorm toolkit: audit a model for BN mistakes, recompute running statistics (precise BN),
freeze BN through ``model.train()``, and convert momentum between the Keras and PyTorch conventions.

Momentum conventions (see ``docs/batchnorm.md``)::

    Keras/TF:  moving  = m * moving  + (1 - m) * batch      (default m = 0.99)
    PyTorch:   running = (1 - p) * running + p * batch      (default p = 0.1)
    p = 1 - m

Everything here is silent (no prints) and raises :class:`converter.errors.ConverterError`
subclasses.

Modules: ``momentum`` (the conventions), ``auditing`` (rules, :func:`audit`, :func:`audit_target`),
``precise`` (:func:`recalibrate`, :func:`recalibrate_checkpoint`), ``freezing`` (:func:`freeze`,
:func:`unfreeze`) and ``common`` (what counts as a BN module, shared by the others).
"""

from __future__ import annotations

from .auditing import (
    RULES,
    SEVERITIES,
    SPEC_FORMS,
    AuditReport,
    Finding,
    Rule,
    audit,
    audit_target,
    resolve_model_spec,
    severity_at_least,
    source_bn_from_metadata,
)
from .common import bn_modules
from .freezing import freeze, is_frozen, unfreeze
from .momentum import from_keras, momentum_from_keras, momentum_to_keras, to_keras
from .precise import recalibrate, recalibrate_checkpoint

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
    "source_bn_from_metadata",
    "resolve_model_spec",
    "SPEC_FORMS",
    "recalibrate",
    "recalibrate_checkpoint",
    "freeze",
    "unfreeze",
    "is_frozen",
    "momentum_from_keras",
    "momentum_to_keras",
    "from_keras",
    "to_keras",
]
