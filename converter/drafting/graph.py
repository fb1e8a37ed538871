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
from typing import Any, Iterator

from ..errors import MappingError, SourceFormatError

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
        """The first input's shape without the batch axis, when the source declares it."""
        for node in self.inputs:
            shape = node.attrs.get("shape")
            if shape:
                return tuple(shape)
        return None


# ------------------------------------------------------------------ Keras configs


def graph_from_keras_config(
    model_config: dict[str, Any], weights: dict[str, dict[str, tuple[int, ...]]]
) -> SourceGraph:
    """The graph of a stored Keras model config (Functional in the Keras 3 and Keras 2 schemas,
    Sequential, nested models flattened with their scope) with ``weights`` (layer name -> variable
    -> shape, as converter/source.py resolved them from the checkpoint)."""
    builder = _KerasGraph(weights)
    outputs = builder.model(model_config, inputs=None, scope="")
    return SourceGraph(builder.nodes, tuple(outputs))


class _KerasGraph:
    """Walks a Keras config; ``alias`` maps a nested model's name (or a nested model's input
    layer) to the nodes that produce its tensor."""

    def __init__(self, weights: dict[str, dict[str, tuple[int, ...]]]) -> None:
        self.weights = weights
        self.nodes: list[SourceNode] = []
        self.alias: dict[str, tuple[str, ...]] = {}

    def model(self, config: dict[str, Any], inputs: tuple[str, ...] | None, scope: str) -> list:
        """Add the model's layers; ``inputs``: the producers feeding a nested model (None at the
        top). Returns the names of the nodes producing its outputs."""
        cfg = config.get("config", config)
        if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
            raise SourceFormatError("the stored model config has no layer list")
        if config.get("class_name") == "Sequential" or "input_layers" not in cfg:
            return self._sequential(cfg["layers"], inputs, scope)
        for entry in cfg["layers"]:
            self._functional_layer(entry, inputs, scope)
        refs = cfg.get("output_layers") or []
        if refs and isinstance(refs[0], str):  # Keras 3 writes one output as a bare reference
            refs = [refs]
        return [p for ref in refs for p in self._ref(ref)]

    def _sequential(self, layers: list, inputs: tuple[str, ...] | None, scope: str) -> list:
        prev: tuple[str, ...] | None = inputs
        for entry in layers:
            name = _layer_name(entry)
            if entry.get("class_name") == "InputLayer":
                if prev is None:
                    self._add(entry, (), scope, kind=INPUT)
                    prev = (name,)
                continue
            if prev is None:  # no InputLayer (Keras 2): the first layer may state the shape
                shape = entry.get("config", {}).get("batch_input_shape")
                cfg = {"name": "input", **({"batch_input_shape": shape} if shape else {})}
                self._add({"class_name": INPUT, "config": cfg}, (), scope, INPUT)
                prev = ("input",)
            prev = self._layer(entry, prev, scope)
        return list(prev or ())

    def _functional_layer(self, entry: dict, inputs: tuple[str, ...] | None, scope: str) -> None:
        name = _layer_name(entry)
        if entry.get("class_name") == "InputLayer":
            if inputs is None:
                self._add(entry, (), scope, kind=INPUT)
            else:
                self.alias[name] = inputs
            return
        refs = list(_inbound_refs(entry.get("inbound_nodes", [])))
        if len({r[1] for r in refs}) > 1:
            raise MappingError(
                f"layer {name!r} is called more than once (a shared layer); a drafted mapping needs"
                " one call per layer: write a --mapping table for this model"
            )
        self._layer(entry, tuple(p for r in refs for p in self._ref(r)), scope)

    def _layer(self, entry: dict, inputs: tuple[str, ...], scope: str) -> tuple[str, ...]:
        """Add one layer (a nested model: its layers) reading ``inputs``; its producers."""
        cfg = entry.get("config", {})
        name = _layer_name(entry)
        if isinstance(cfg, dict) and isinstance(cfg.get("layers"), list):
            inner = f"{scope}/{name}" if scope else name
            self.alias[name] = tuple(self.model(entry, inputs, inner))
            return self.alias[name]
        self._add(entry, inputs, scope)
        return (name,)

    def _add(self, entry: dict, inputs: tuple[str, ...], scope: str, kind: str = "") -> None:
        cfg = entry.get("config", {}) if isinstance(entry.get("config"), dict) else {}
        name = _layer_name(entry)
        kind = kind or entry.get("class_name", "")
        attrs = keras_attrs(cfg)
        node = SourceNode(name, kind, dict(self.weights.get(name, {})), attrs, inputs, scope, cfg)
        self.nodes.append(node)

    def _ref(self, ref: Any) -> tuple[str, ...]:
        """A (layer name, node index, tensor index) reference -> the node names producing it."""
        name = ref[0]
        return self.alias.get(name, (name,))


def _layer_name(entry: dict) -> str:
    cfg = entry.get("config", {})
    return (cfg.get("name") if isinstance(cfg, dict) else None) or entry.get("name", "")


def _inbound_refs(inbound: Any) -> Iterator[tuple[str, int, int]]:
    """(layer, node index, tensor index) of each tensor a layer reads: Keras 3 nodes are dicts of
    ``args``/``kwargs`` holding ``__keras_tensor__`` entries with a ``keras_history``; Keras 2
    nodes are lists of ``[layer, node_index, tensor_index, kwargs]``."""
    for node in inbound:
        if isinstance(node, dict):
            yield from _keras3_refs(node)
        else:
            for ref in node:
                if isinstance(ref, list) and ref and isinstance(ref[0], str):
                    yield ref[0], int(ref[1]), int(ref[2])


def _keras3_refs(obj: Any) -> Iterator[tuple[str, int, int]]:
    if isinstance(obj, dict):
        history = obj.get("config", {}).get("keras_history") if "config" in obj else None
        if obj.get("class_name") == "__keras_tensor__" and history:
            yield history[0], int(history[1]), int(history[2])
            return
        for value in obj.values():
            yield from _keras3_refs(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _keras3_refs(value)


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
