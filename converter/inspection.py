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


def inspect(
    path: str | os.PathLike, format: str | None = None, graph: bool = False
) -> dict[str, Any]:
    """Describe a file: format, tensors (key, shape, dtype), and for Keras sources the resolved
    layers with their BN configuration and where that configuration came from (``file``: the
    file's own model config; ``manifest``: the table's declared Keras architecture defaults);
    ``graph``: every layer, weighted or not, with its settings and inputs (see layer_graph)."""
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
    if raw.format == "onnx":  # converter.onnx_source
        return {**info, **_onnx_info(raw)}
    try:
        source = resolve_source(raw)
    except ConverterError as exc:
        info["layers"] = None
        info["resolution_error"] = str(exc)
        return info
    info["architecture"] = source.manifest_id
    info["config_origin"] = source.config_origin
    info["notes"] = source.notes
    info.update(_family(source.manifest_id))
    info["head"] = source.known_head.report() if source.known_head else None
    info["nesting"] = source.nesting.report() if source.nesting else None
    info["layers"] = [
        {
            "name": lay.name,
            "scope": lay.scope,
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
    if graph:
        info["graph"] = layer_graph(source.layers, source.raw.model_config)
    return info


GRAPH_KEYS = (
    "filters", "units", "kernel_size", "strides", "padding", "dilation_rate", "groups",
    "depth_multiplier", "pool_size", "activation", "use_bias", "axis", "momentum", "epsilon",
    "rate", "target_shape",
)  # fmt: skip


def layer_graph(layers: list[Any], model_config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every layer in model order: class, the config keys that shape its computation, and the
    layers it takes its inputs from (None where the source records no connections)."""
    inputs = inbound_layers(model_config) if model_config else {}
    return [
        {
            "name": lay.name,
            "scope": lay.scope,
            "class": lay.class_name,
            "config": {k: lay.config[k] for k in GRAPH_KEYS if k in lay.config},
            "inputs": inputs.get((lay.scope, lay.name)),
        }
        for lay in layers
    ]


def inbound_layers(model_config: dict[str, Any], scope: str = "") -> dict[tuple, list[str]]:
    """(scope, layer name) -> the names of the layers feeding it, from a Keras 2 or 3 model config
    (``inbound_nodes``; a Sequential's layers each take the one before)."""
    cfg = model_config.get("config", model_config)
    entries = cfg.get("layers", []) if isinstance(cfg, dict) else []
    sequential = model_config.get("class_name") == "Sequential"
    out: dict[tuple, list[str]] = {}
    previous: str | None = None
    for entry in entries:
        name = (entry.get("config") or {}).get("name") or entry.get("name")
        if sequential and entry.get("class_name") == "InputLayer":
            continue
        if sequential:
            out[(scope, name)] = [previous] if previous else []
        else:
            out[(scope, name)] = _history_names(entry.get("inbound_nodes", []))
        previous = name
        if isinstance(entry.get("config"), dict) and "layers" in entry["config"]:
            out.update(inbound_layers(entry, name))
    return out


def _history_names(nodes: Any) -> list[str]:
    """Layer names in an ``inbound_nodes`` value: Keras 3 ``keras_history`` triples, Keras 2
    ``[name, node, tensor, kwargs]`` lists."""
    found: list[str] = []
    if isinstance(nodes, dict):
        history = (nodes.get("config") or {}).get("keras_history")
        if isinstance(history, list) and history and isinstance(history[0], str):
            return [history[0]]
        for v in nodes.values():
            found += _history_names(v)
    elif isinstance(nodes, list):
        if len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
            return [nodes[0]]
        for v in nodes:
            found += _history_names(v)
    return list(dict.fromkeys(found))


def _onnx_info(raw: Any) -> dict[str, Any]:
    from .onnx_source import inspect_onnx

    return inspect_onnx(raw)


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
