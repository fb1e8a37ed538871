"""``converter.inspect``: what a file holds, for any source format and for our own outputs."""

from __future__ import annotations

import json
import os
from typing import Any

from . import formats
from .errors import ConverterError
from .refusals import refusal_for
from .source import resolve_source
from .tables import builtin_tables

BN_KEYS = ("momentum", "epsilon", "center", "scale", "axis", "renorm")


def inspect(path: str | os.PathLike, format: str | None = None) -> dict[str, Any]:
    """Describe a file: format, tensors (key, shape, dtype), and for Keras sources the resolved
    layers with their BN configuration and where that configuration came from (``file``: the
    file's own model config; ``manifest``: the table's declared Keras architecture defaults)."""
    raw = formats.read(path, format)
    info: dict[str, Any] = {
        "path": str(raw.path),
        "format": raw.format,
        "tensors": [
            {"key": k, "shape": list(t.shape), "dtype": t.dtype} for k, t in raw.tensors.items()
        ],
        "ignored": [{"key": k, "why": w} for k, w in raw.ignored.items()],
    }
    if raw.format in ("safetensors", "pt"):
        meta = dict(raw.metadata)
        info["metadata"] = {
            k: v for k, v in meta.items() if k not in ("bn_config", "preprocessing", "dropped")
        }
        for k in ("bn_config", "preprocessing", "surgeries"):
            if k in meta:
                info[k] = json.loads(meta[k])
        return info
    if raw.format == "onnx":
        from .onnx_source import inspect_onnx

        return {**info, **inspect_onnx(raw)}
    try:
        source = resolve_source(raw)
    except ConverterError as exc:
        info["layers"] = None
        info["resolution_error"] = str(exc)
        return info
    info["architecture"] = source.manifest_id
    info["config_origin"] = source.config_origin
    info.update(_family(source.manifest_id))
    info["head"] = source.head.report() if source.head else None
    info["nesting"] = source.nesting.report() if source.nesting else None
    info["layers"] = [
        {
            "name": lay.name,
            "class": lay.class_name,
            "vars": {
                v: {"key": lay.keys[v], "shape": list(t.shape), "dtype": t.dtype}
                for v, t in lay.weights.items()
            },
            **(
                {"bn": {k: lay.config[k] for k in BN_KEYS if k in lay.config}}
                if lay.class_name == "BatchNormalization"
                else {}
            ),
        }
        for lay in source.layers
        if lay.weights or lay.class_name in ("Rescaling", "Normalization")
    ]
    return info


def _family(manifest_id: str | None) -> dict[str, Any]:
    """The table family and the variant (source manifest) a resolved source belongs to."""
    for table in builtin_tables():
        targets = [v.target for v in table.variants if v.source == manifest_id]
        if manifest_id and targets:
            return {
                "family": table.family,
                "table": table.id,
                "variant": manifest_id,
                "targets": targets,
            }
    refusal = refusal_for(manifest_id)
    return {
        "family": None,
        "table": None,
        "variant": manifest_id,
        "targets": [],
        **({"refused": refusal.reason} if refusal else {}),
    }
