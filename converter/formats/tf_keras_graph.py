"""The Keras model a tf.keras 2.x SavedModel describes, read without TensorFlow.

``model.save(dir)`` in tf.keras 2.x (``tf_keras``, TF <= 2.15's ``tf.keras``) stores every layer's
JSON metadata (name, class, config: BN momentum/eps, ...): in ``keras_metadata.pb`` (a
``SavedMetadata``: nodes {node_id = 2, node_path = 3 ("root.layer_with_weights-0"), identifier = 4
("_tf_keras_layer"), metadata = 5}) since TF 2.5, and before that in ``saved_model.pb`` (SavedModel
meta_graphs = 2 -> MetaGraphDef object_graph_def = 7 -> SavedObjectGraph nodes = 1 -> SavedObject
children = 1, user_object = 4 -> SavedUserObject identifier = 1, metadata = 3). The variables'
checkpoint keys come from the bundle's own object graph (``_CHECKPOINTABLE_OBJECT_GRAPH``, a
TrackableObjectGraph: nodes = 1 -> children = 1 {node_id = 1, local_name = 2}, attributes = 2
{name = 1, checkpoint_key = 3}): a nested model's variables are often keyed ``variables/<i>`` (the
first path to them), so layers are found through the object graph, never through key names.

Keras 3's ``model.export`` writes no Keras metadata: :func:`read_keras_graph` returns None there.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SourceFormatError
from . import protowire as pw

__all__ = ["KerasGraph", "read_keras_graph", "object_graph"]

_MODEL_IDS = ("_tf_keras_network", "_tf_keras_model", "_tf_keras_sequential")
_LAYER_CHILD = re.compile(r"^layer-(\d+)$")


@dataclass
class KerasGraph:
    """What a tf.keras SavedModel says about its model."""

    model_config: dict[str, Any]
    object_paths: dict[str, tuple[str, str, str]]  # checkpoint key -> (nested model, layer, var)
    source: str  # the file the metadata came from
    notes: list[str] = field(default_factory=list)


@dataclass
class _Node:
    children: list[tuple[str, int]]
    attributes: dict[str, str]  # attribute name (VARIABLE_VALUE) -> checkpoint key


def object_graph(blob: bytes) -> list[_Node]:
    """A TrackableObjectGraph (a checkpoint's ``_CHECKPOINTABLE_OBJECT_GRAPH``) as nodes."""
    nodes = []
    for raw in pw.repeated(blob, 1):
        children = [(pw.text(c, 2), int(pw.first(c, 1) or 0)) for c in pw.repeated(raw, 1)]
        attrs = {pw.text(a, 1): pw.text(a, 3) for a in pw.repeated(raw, 2)}
        nodes.append(_Node(children, attrs))
    return nodes


def _walk(nodes: list[_Node], path: str) -> int | None:
    """The node id at a metadata path (``root.layer_with_weights-3.layer-0``), or None."""
    node = 0
    for part in path.split(".")[1:]:
        found = [i for name, i in nodes[node].children if name == part]
        if not found or found[0] >= len(nodes):
            return None
        node = found[0]
    return node


def _metadata_from_keras_pb(path: Path) -> dict[str, tuple[str, str]]:
    """node path -> (identifier, metadata JSON) from ``keras_metadata.pb``."""
    out = {}
    for raw in pw.repeated(path.read_bytes(), 1):
        out[pw.text(raw, 3)] = (pw.text(raw, 4), pw.text(raw, 5))
    return out


def _metadata_from_saved_model(path: Path) -> dict[str, tuple[str, str]]:
    """node path (first path from the root) -> (identifier, metadata JSON) from the SavedObjectGraph
    user objects of ``saved_model.pb`` (tf.keras before TF 2.5)."""
    metas = pw.repeated(path.read_bytes(), 2)
    graph = pw.first(metas[0], 7) if metas else None
    if not isinstance(graph, bytes):
        return {}
    objs = pw.repeated(graph, 1)
    paths: dict[int, str] = {0: "root"}
    queue = [0]
    while queue:
        i = queue.pop(0)
        for ref in pw.repeated(objs[i], 1):
            child = int(pw.first(ref, 1) or 0)
            if child not in paths and child < len(objs):
                paths[child] = f"{paths[i]}.{pw.text(ref, 2)}"
                queue.append(child)
    out = {}
    for i, p in paths.items():
        user = pw.first(objs[i], 4)
        if isinstance(user, bytes) and pw.text(user, 3):
            out[p] = (pw.text(user, 1), pw.text(user, 3))
    return out


def _untuple(value: Any) -> Any:
    """tf.keras' JSON encoder writes tuples as ``{"class_name": "__tuple__", "items": [...]}``."""
    if isinstance(value, dict):
        if value.get("class_name") == "__tuple__" and "items" in value:
            return [_untuple(v) for v in value["items"]]
        return {k: _untuple(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untuple(v) for v in value]
    return value


def read_keras_graph(directory: Path, ckpt_graph: bytes | None) -> KerasGraph | None:
    """The Keras model config and each variable's layer, for a tf.keras 2.x SavedModel ``directory``
    whose variables bundle holds the object graph ``ckpt_graph``; None when it carries no Keras
    metadata (Keras 3 export, a plain ``tf.saved_model.save``)."""
    try:
        keras_pb = directory / "keras_metadata.pb"
        if keras_pb.is_file():
            meta, source = _metadata_from_keras_pb(keras_pb), keras_pb.name
        else:
            meta, source = (
                _metadata_from_saved_model(directory / "saved_model.pb"),
                "saved_model.pb",
            )
        if not meta.get("root", ("",))[0].startswith("_tf_keras_") or ckpt_graph is None:
            return None
        nodes = object_graph(ckpt_graph)
        by_node = _metadata_by_node(meta, nodes)
    except (pw.ProtoError, json.JSONDecodeError, OSError, IndexError) as exc:
        raise SourceFormatError(
            f"{directory}: its Keras metadata cannot be read ({exc}); the SavedModel is damaged"
        ) from exc
    layers, paths = _model_layers(0, "", nodes, by_node)
    root = by_node.get(0, ("", {}))[1]
    config, notes = _model_config(root), []
    if config is None:
        config = _synthesized(root, layers)
        notes.append(
            f"{source} has no model config (a layer without get_config?): layers and weights"
            " read from its per-layer metadata, without the graph's connections"
        )
    return KerasGraph(_untuple(config), paths, source, notes)


def _model_config(root: dict[str, Any]) -> dict[str, Any] | None:
    """The root's ``model_config``, else its layer config (a model with a layer that has no
    ``get_config`` gets ``model_config = {"class_name": ...}`` only), else None."""
    for cfg in (root.get("model_config"), {"class_name": root.get("class_name")} | root):
        if isinstance(cfg, dict) and isinstance(cfg.get("config"), dict):
            if "layers" in cfg["config"]:
                return {
                    "class_name": cfg.get("class_name") or "Functional",
                    "config": cfg["config"],
                }
    return None


def _metadata_by_node(
    meta: dict[str, tuple[str, str]], nodes: list[_Node]
) -> dict[int, tuple[str, dict[str, Any]]]:
    out = {}
    for path, (ident, blob) in meta.items():
        node = _walk(nodes, path)
        if node is not None and node not in out:
            out[node] = (ident, json.loads(blob) if blob else {})
    return out


def _model_layers(
    node: int, scope: str, nodes: list[_Node], meta: dict[int, tuple[str, dict[str, Any]]]
) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str, str]]]:
    """The layers (``layer-N`` children, in order) of the model at ``node`` as config entries, and
    each of their variables' checkpoint key -> (scope, layer name, variable name)."""
    children = sorted(
        (int(m[1]), i) for name, i in nodes[node].children if (m := _LAYER_CHILD.match(name))
    )
    layers, paths = [], {}
    for _, child in children:
        ident, md = meta.get(child, ("", {}))
        name = md.get("name") or f"layer_{child}"
        entry = {"class_name": md.get("class_name", "Layer"), "name": name}
        entry["config"] = md.get("config") or {"name": name}
        if ident in _MODEL_IDS:
            inner, inner_paths = _model_layers(child, name, nodes, meta)
            if not md.get("config"):
                entry["config"] = {"name": name, "layers": inner}
            paths.update(inner_paths)
        else:
            paths.update(_variables(child, scope, name, nodes))
        layers.append(entry)
    return layers, paths


def _variables(
    layer: int, scope: str, name: str, nodes: list[_Node]
) -> dict[str, tuple[str, str, str]]:
    out = {}
    for local, child in nodes[layer].children:
        key = nodes[child].attributes.get("VARIABLE_VALUE") if child < len(nodes) else None
        if key:
            out[key] = (scope, name, local)
    return out


def _synthesized(root: dict[str, Any], layers: list[dict[str, Any]]) -> dict[str, Any]:
    """A model config from the layers' own metadata, when the model's config was not serializable
    (a custom layer without ``get_config``): no graph connections, names/classes/configs only."""
    return {
        "class_name": root.get("class_name", "Functional"),
        "config": {"name": root.get("name", "model"), "layers": layers},
    }
