"""Format-neutral source graph for drafted mappings.

A :class:`SourceGraph` is what the aligner (converter/drafting/align.py) reads of a source model:
its nodes in execution order, each a :class:`SourceNode` with its class (``kind``), its weights
(variable name -> shape), its hyper-parameters (``attrs``, with canonical keys: ``kernel_size``,
``strides``, ``dilation``, ``groups``) and the names of the nodes it reads (``inputs``). Nodes
without weights are kept: they carry the data flow between weighted ones. The model's inputs are
nodes of kind :data:`INPUT` and its outputs are listed in ``outputs``.

Nothing here is Keras-specific except :func:`graph_from_keras_config`; an ONNX reader builds the
same graph from an ONNX ``GraphProto`` (initialisers as ``weights``, node attributes as ``attrs``)
and the aligner needs nothing else. ``kind`` is the name the transforms' ``pairs`` use on the
source side (Keras layer classes today).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MappingError
from ..keras_graph import Graph, Ref, layer_name, walk_config

INPUT = "<input>"  # kind of a model input node


@dataclass
class SourceNode:
    """One operation of the source model (see the module docstring)."""

    name: str
    kind: str
    weights: dict[str, tuple[int, ...]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    scope: str = ""  # the nested model it was flattened out of ("" for the model's own)
    config: dict[str, Any] = field(default_factory=dict)  # the source's own description of it

    @property
    def path(self) -> str:
        return f"{self.scope}/{self.name}" if self.scope else self.name


@dataclass
class SourceGraph:
    """Nodes in execution order (each after the nodes it reads), plus the model's output nodes."""

    nodes: list[SourceNode]
    outputs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.by_name = {n.name: n for n in self.nodes}

    @property
    def weighted(self) -> list[SourceNode]:
        return [n for n in self.nodes if n.weights]

    @property
    def inputs(self) -> list[SourceNode]:
        return [n for n in self.nodes if n.kind == INPUT]

    def weighted_inputs(self, name: str) -> frozenset[str]:
        """The nearest weighted nodes (or model inputs) whose outputs reach ``name``'s input
        through unweighted nodes only: the edges of the graph contracted to its weighted nodes."""
        out: set[str] = set()
        stack = list(self.by_name[name].inputs)
        seen: set[str] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            node = self.by_name[n]
            if node.weights or node.kind == INPUT:
                out.add(n)
            else:
                stack.extend(node.inputs)
        return frozenset(out)

    def input_dtype(self) -> str:
        """The first input's dtype (``float32`` unless the source says otherwise)."""
        for node in self.inputs:
            dtype = node.attrs.get("dtype")
            if isinstance(dtype, str):
                return dtype
        return "float32"

    def input_shape(self) -> tuple[int | None, ...] | None:
        """The first input's shape without the batch axis, when the source declares it, else what
        the first weighted layer reads (a TF1 checkpoint's layers inferred from variable names
        declare no input): ``(width,)`` before a Dense, ``(None, ..., channels)`` before a
        convolution."""
        for node in self.inputs:
            shape = node.attrs.get("shape")
            if shape:
                return tuple(shape)
        first = next((n for n in self.nodes if n.weights), None)
        kernel = first.weights.get("kernel") if first else None
        if not kernel:
            return None
        if first.kind == "Dense":
            return (kernel[0],)
        if first.kind.startswith("Conv"):
            return (None,) * (len(kernel) - 2) + (kernel[-2],)
        return None


# ------------------------------------------------------------------ Keras configs


def graph_from_keras_config(
    model_config: dict[str, Any], weights: dict[str, dict[str, tuple[int, ...]]]
) -> SourceGraph:
    """The graph of a stored Keras model config (Functional in the Keras 3 and Keras 2 schemas,
    Sequential, nested models flattened with their scope: converter/keras_graph.py reads it) with
    ``weights`` (layer name -> variable -> shape, as converter/source.py resolved them from the
    checkpoint)."""
    graph = walk_config(model_config)
    if graph.shared:
        raise MappingError(
            f"layer {_first_shared(graph)!r} is called more than once (a shared layer); a drafted"
            " mapping needs one call per layer: write a --mapping table for this model"
        )
    names = _Producers(graph, model_config["config"]["layers"])
    nodes = [_input_node(entry, names.of(ref)[0], shape) for (ref, shape, _), entry in names.inputs]
    for call in graph.calls:
        inputs = tuple(p for ref in call.tensors + call.kwarg_tensors for p in names.of(ref))
        cfg = call.config if isinstance(call.config, dict) else {}
        attrs = keras_attrs(cfg)
        node_weights = dict(weights.get(call.layer, {}))
        nodes.append(
            SourceNode(call.layer, call.class_name, node_weights, attrs, inputs, call.scope, cfg)
        )
    outputs = tuple(p for ref in graph.outputs for p in names.of(ref))
    return SourceGraph(nodes, outputs)


def _first_shared(graph: Graph) -> str:
    return next(call.layer for call in graph.calls if call.layer in graph.shared)


class _Producers:
    """The node names producing a tensor of the walked graph: a model input's node, the layer
    that computed it, or (a Keras 2 reference to a nested model by a node index of its own) the
    nodes producing that nested model's outputs."""

    def __init__(self, graph: Graph, layers: list[dict[str, Any]]) -> None:
        self.graph = graph
        order = {id(entry): i for i, entry in enumerate(layers)}
        self.inputs = list(zip(graph.inputs, graph.input_layers))
        self.inputs.sort(key=lambda item: order.get(id(item[1]), 0))  # as the config lists them
        self.input_names = {
            ref: layer_name(entry) if entry is not None else "input"
            for (ref, _, _), entry in self.inputs
        }

    def of(self, ref: Ref) -> tuple[str, ...]:
        if ref in self.input_names:
            return (self.input_names[ref],)
        if ref.layer in self.graph.nested:
            return tuple(p for out in self.graph.nested[ref.layer] for p in self.of(out))
        return (ref.layer,)


def _input_node(entry: dict[str, Any] | None, name: str, shape: Any = None) -> SourceNode:
    """The node of a model input: its InputLayer, or one named ``input`` (a Sequential model
    without an InputLayer: its first layer may state the shape)."""
    if entry is None:
        stated = {"batch_input_shape": [None, *shape]} if shape else {}
        entry = {"config": {"name": name, **stated}}
    cfg = entry.get("config") if isinstance(entry.get("config"), dict) else {}
    return SourceNode(name, INPUT, {}, keras_attrs(cfg), (), "", cfg)


KERAS_ATTRS = {
    "kernel_size": "kernel_size",
    "strides": "strides",
    "dilation_rate": "dilation",
    "groups": "groups",
}


def keras_attrs(cfg: dict[str, Any]) -> dict[str, Any]:
    """A Keras layer config's hyper-parameters under the graph's canonical keys (tuples), plus
    the input shape of an InputLayer (``shape``, batch axis dropped)."""
    out: dict[str, Any] = {}
    for key, canon in KERAS_ATTRS.items():
        if key in cfg:
            value = cfg[key]
            out[canon] = tuple(value) if isinstance(value, (list, tuple)) else value
    if cfg.get("activation") not in (None, "linear"):
        out["activation"] = cfg["activation"]  # fused: the layer's output is after it
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
    if shape:
        out["shape"] = tuple(shape[1:])
        if isinstance(cfg.get("dtype"), str):
            out["dtype"] = cfg["dtype"]
    return out
