"""ckptport: convert TensorFlow/Keras checkpoints to PyTorch state dicts, with BatchNorm done right.

Public API (imported lazily, so ``import converter`` loads neither TensorFlow nor PyTorch)::

    result = converter.convert("model.keras", to="timm:tf_efficientnet_b0")
    result.save("model.safetensors")
    model = converter.load_model("model.safetensors")      # eval mode, BN momentum/eps applied
    report = converter.verify("model.keras", "model.safetensors")
    info = converter.inspect("model.keras")
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import ConverterError

__version__ = "0.1.0"

_LAZY = {
    "convert": "converter.pipeline",
    "convert_file": "converter.pipeline",
    "draft": "converter.drafting",
    "ConversionResult": "converter.pipeline",
    "load_model": "converter.model",
    "build_target": "converter.model",
    "inspect": "converter.inspection",
    "verify": "converter.verification",
    "VerificationReport": "converter.verification",
    "VerifyOptions": "converter.verification",
    "bn": "converter.bn",
    "testing": "converter.testing",
}

__all__ = ["ConverterError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'converter' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith("." + name) else getattr(module, name)
    globals()[name] = value
    return value
