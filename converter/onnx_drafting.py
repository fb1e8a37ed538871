"""ONNX -> drafting: an ONNX graph as the drafting aligner's format-neutral ``SourceGraph``, so
that an export whose names are opaque (``W123``, ``onnx::Conv_5``, tf2onnx's TF op names) maps
onto the target by structure (converter/drafting/align.py) instead of by name.

Every ONNX node is a ``SourceNode`` (kind: its op type; the ONNX-op transforms declare which torch
modules each op pairs with); weighted nodes carry their variables' shapes and Conv's kernel,
strides, dilations and group as the canonical hyper-parameters; constants (initializers,
``Constant`` nodes, their ``Identity`` aliases) are not nodes, so edges are the data flow only.
"""

from __future__ import annotations

from typing import Any

# ONNX attribute -> the aligner's canonical hyper-parameter key
HYPER_ATTRS = {"kernel_shape": "kernel_size", "strides": "strides", "dilations": "dilation"}


def onnx_source_graph(source: Any) -> Any:
    """The ``SourceGraph`` of an ONNX source (converter.onnx_source.onnx_source): its weighted
    nodes take their layer's name and variables; an identity BatchNorm added for a folded conv
    (config ``after``) is a node right after that conv."""
    from .drafting.graph import INPUT, SourceGraph, SourceNode

    graph = source.raw.graph
    by_output = {lay.output: lay for lay in graph.layers}
    layers = {lay.name: lay for lay in source.layers}
    added = {lay.config["after"]: lay for lay in source.layers if "after" in lay.config}
    producer: dict[str, str] = {name: name for name, _ in graph.inputs}
    nodes = [SourceNode(name, INPUT) for name, _ in graph.inputs]
    for i, node in enumerate(graph.nodes):
        if not node.outputs or node.outputs[0] in graph.constant_names:
            continue  # a constant (Constant node, Identity of an initializer)
        onnx_layer = by_output.get(node.outputs[0])
        name = onnx_layer.name if onnx_layer is not None else f"{node.op}:{i}"
        inputs = tuple(dict.fromkeys(producer[t] for t in node.inputs if t in producer))
        nodes.append(_node(SourceNode, name, node.op, layers.get(name), onnx_layer, inputs))
        if name in added:
            bn = added[name]
            nodes.append(_node(SourceNode, bn.name, bn.class_name, bn, None, (name,)))
            name = bn.name
        for out in node.outputs:
            producer[out] = name
    outputs = tuple(producer[o] for o in graph.outputs if o in producer)
    return SourceGraph(nodes, outputs)


def _node(cls: Any, name: str, op: str, layer: Any, onnx_layer: Any, inputs: tuple) -> Any:
    """A SourceNode; weighted when ``layer`` (a SourceLayer) is given."""
    if layer is None:
        return cls(name, op, inputs=inputs)
    weights = {v: tuple(t.shape) for v, t in layer.weights.items()}
    cfg = layer.config
    attrs = {canon: tuple(cfg[a]) for a, canon in HYPER_ATTRS.items() if a in cfg}
    if "group" in cfg:
        attrs["groups"] = int(cfg["group"])
    return cls(name, layer.class_name, weights, attrs, inputs, config=dict(cfg))


def align_onnx(source: Any, variant: Any, manifest: dict[str, Any]) -> dict[str, str]:
    """Source layer -> target module by structure (the drafting aligner), for ONNX layers whose
    names are not the target's."""
    from .drafting.align import align
    from .drafting.target import trace_target
    from .model import build_target

    model = build_target(variant.target, **variant.target_kwargs)
    target = trace_target(model, [_input_shape(source.raw.graph)])
    matches = align(onnx_source_graph(source), target)
    return {m.source.name: m.target.name for m in matches}


def _input_shape(graph: Any) -> tuple[int, ...]:
    """A batch-of-2 NCHW dummy shape from the graph's first input (NHWC exports transposed)."""
    from .onnx_runner import channels_last

    dims = list(graph.inputs[0][1]) if graph.inputs else []
    dims = [d if isinstance(d, int) and d > 0 else 32 for d in dims] or [2, 3, 32, 32]
    if channels_last(dims):
        dims = [dims[0], dims[3], dims[1], dims[2]]
    return (2, *dims[1:])
