"""The Keras graph of a stored model config, as calls in order: which layer runs on which tensors.

The one reader of a Keras config's layer calls and their inbound references: ``ckptport port``
(converter/porting/) writes code from it and drafted mappings (converter/drafting/graph.py) build
their weighted source graph on it. Reads Keras 3 (``.keras``) and Keras 2 style (legacy ``.h5``)
configs, Functional and Sequential, and inlines nested models (a Sequential block or an application
used as a layer): their layers become calls of the outer graph (``Call.scope`` names the nested
model), wired to the tensors the nested model was called on. Nothing is deserialized: this reads
the JSON only, so a Lambda's stored code is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import SourceFormatError, UnsupportedLayerError

MODEL_CLASSES = ("Functional", "Model", "Sequential")


@dataclass(frozen=True)
class Ref:
    """One tensor: output ``index`` of call ``node`` of layer ``layer``."""

    layer: str
    node: int = 0
    index: int = 0


@dataclass
class Call:
    """One call of a Keras layer: its inputs (tensors or constants, in call order) and output."""

    layer: str
    class_name: str
    config: dict[str, Any]
    inputs: list[Any]  # Ref or a constant (a Keras op's scalar operand)
    output: Ref
    kwargs: dict[str, Any] = field(default_factory=dict)
    is_op: bool = False  # a Keras op (``x + 3.0``), not a layer
    scope: str = (
        ""  # the nested model it was inlined from (``outer/inner``; "" for the model's own)
    )
    kwarg_tensors: list[Ref] = field(default_factory=list)  # tensors passed as keyword arguments

    @property
    def tensors(self) -> list[Ref]:
        return [r for r in self.inputs if isinstance(r, Ref)]


@dataclass
class Graph:
    """The model's inputs (name, Keras shape without batch, dtype), its calls in order, its
    outputs; ``shared``: layers called more than once. ``input_layers``: the InputLayer entry of
    each input (None: a Sequential model without one); ``nested``: each inlined model's name ->
    its output tensors (a Keras 2 config may refer to them by a node index of its own)."""

    inputs: list[tuple[Ref, list[int | None] | None, str]]
    calls: list[Call]
    outputs: list[Ref]
    input_layers: list[dict[str, Any] | None] = field(default_factory=list)
    nested: dict[str, list[Ref]] = field(default_factory=dict)

    @property
    def shared(self) -> set[str]:
        seen: dict[str, int] = {}
        for call in self.calls:
            seen[call.layer] = seen.get(call.layer, 0) + 1
        return {name for name, n in seen.items() if n > 1}


def read_graph(model_config: dict[str, Any], label: str) -> Graph:
    """The graph of a stored model config (``model_config`` of a ``.keras`` or legacy ``.h5``),
    a Functional or Sequential model whose inputs declare their shapes."""
    if model_config.get("class_name") not in MODEL_CLASSES:
        raise SourceFormatError(
            f"{label}: the stored config is a {model_config.get('class_name')!r}, not a Keras"
            " Functional or Sequential model"
        )
    graph = walk_config(model_config, label)
    for ref, shape, _ in graph.inputs:
        if shape is None:
            what = (
                "the Sequential model" if _is_sequential(model_config) else f"input {ref.layer!r}"
            )
            raise SourceFormatError(f"{label}: {what} declares no input shape")
    return graph


def walk_config(model_config: dict[str, Any], label: str = "") -> Graph:
    """The graph of any stored model config with a layer list; an input's shape is None where
    the config does not declare it."""
    cfg = model_config.get("config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("layers"), list):
        where = f"{label}: " if label else ""
        raise SourceFormatError(f"{where}the stored model config has no layer list")
    walk = _Walk(label)
    inputs, entries = walk.model_inputs(model_config)
    outputs = walk.model(model_config, [ref for ref, _, _ in inputs], "")
    return Graph(inputs, walk.calls, outputs, entries, walk.nested)


class _Walk:
    """Walks a model config, nested models inlined; ``alias`` maps a nested model's own tensors
    (its inputs, its outputs as seen from outside) to the tensors they stand for."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls: list[Call] = []
        self.alias: dict[Ref, Ref] = {}
        self.nested: dict[str, list[Ref]] = {}

    def model_inputs(self, model_config: dict[str, Any]) -> tuple[list[tuple], list]:
        """(tensor, shape or None, dtype) of each input, and its InputLayer entry."""
        cfg = model_config["config"]
        entries = _layers(cfg)
        if _is_sequential(model_config):
            first = [e for e in entries if e.get("class_name") == "InputLayer"][:1] or [None]
            shape = sequential_input_shape(cfg, entries)
            return [(Ref(layer_name(cfg) + "_input"), shape, "float32")], first
        by_name = {layer_name(e): e for e in entries}
        out, used = [], []
        for ref in _refs(cfg.get("input_layers")):
            used.append(by_name[ref.layer])
            entry_cfg = by_name[ref.layer].get("config", {})
            shape = entry_cfg.get("batch_shape") or entry_cfg.get("batch_input_shape")
            dtype = str(entry_cfg.get("dtype", "float32"))
            out.append((ref, list(shape[1:]) if shape else None, dtype))
        return out, used

    def model(self, model_config: dict[str, Any], inputs: list[Ref], scope: str) -> list[Ref]:
        """Add the calls of one (possibly nested) model fed by ``inputs``; its output tensors."""
        cfg = model_config["config"]
        if _is_sequential(model_config):
            return [self._sequential(cfg, inputs[0], scope)]
        own_inputs = _refs(cfg.get("input_layers"))
        if len(own_inputs) != len(inputs):
            raise UnsupportedLayerError(
                f"{self.label}: nested model {layer_name(cfg)!r} takes {len(own_inputs)} inputs,"
                f" called with {len(inputs)}"
            )
        self.alias.update((a, b) for a, b in zip(own_inputs, inputs) if a != b)
        for entry in _layers(cfg):
            if entry.get("class_name") != "InputLayer":
                self._entry(entry, scope)
        return [self.resolve(r) for r in _refs(cfg.get("output_layers"))]

    def _sequential(self, cfg: dict[str, Any], x: Ref, scope: str) -> Ref:
        for entry in _layers(cfg):
            if entry.get("class_name") == "InputLayer":
                continue
            x = self._call(entry, [x], {}, 0, scope)
        return x

    def _entry(self, entry: dict[str, Any], scope: str) -> None:
        for node_index, node in enumerate(entry.get("inbound_nodes") or []):
            args, kwargs = _node_inputs(node)
            resolved = [self.resolve(a) if isinstance(a, Ref) else a for a in args]
            self._call(entry, resolved, kwargs, node_index, scope)

    def resolve(self, ref: Ref) -> Ref:
        while ref in self.alias:
            ref = self.alias[ref]
        return ref

    def _call(self, entry: dict, inputs: list[Any], kwargs: dict, node: int, scope: str) -> Ref:
        name, cls = layer_name(entry), entry.get("class_name", "")
        cfg = entry.get("config") or {}
        if cls in MODEL_CLASSES or (isinstance(cfg, dict) and "layers" in cfg):
            inner = f"{scope}/{name}" if scope else name
            outs = self.model(entry, [i for i in inputs if isinstance(i, Ref)], inner)
            for k, out in enumerate(outs):
                self.alias[Ref(name, node, k)] = out
            self.nested[name] = outs
            return outs[0]
        is_op = is_op_entry(entry)
        out = Ref(name, node, 0)
        tensors = [self.resolve(r) for r in _keras3_tensors(kwargs)]
        self.calls.append(Call(name, cls, cfg, inputs, out, kwargs, is_op, scope, tensors))
        return out


def is_op_entry(entry: dict[str, Any]) -> bool:
    """A Keras op (``x + 3.0``), not a layer: its module says so in a ``.keras`` config; a legacy
    config writes no module, and an op's config holds neither ``trainable`` nor ``dtype`` (every
    layer's does)."""
    cfg = entry.get("config")
    if "module" in entry and entry["module"] is not None:
        return str(entry["module"]).startswith(("keras.src.ops", "keras.ops"))
    keys = set(cfg) if isinstance(cfg, dict) else set()
    return not keys & {"trainable", "dtype"} and entry.get("class_name") != "InputLayer"


def layer_name(entry: dict[str, Any]) -> str:
    """A layer entry's (or a model config's) name."""
    cfg = entry.get("config")
    return entry.get("name") or (cfg.get("name") if isinstance(cfg, dict) else None) or "?"


def _layers(cfg: Any) -> list[dict[str, Any]]:
    return cfg.get("layers", []) if isinstance(cfg, dict) else list(cfg or [])


def _refs(spec: Any) -> list[Ref]:
    """``[name, node, index]`` or a list of them (Keras writes a single output unwrapped)."""
    if not spec:
        return []
    if isinstance(spec[0], str):
        return [Ref(spec[0], int(spec[1]), int(spec[2]))]
    return [Ref(s[0], int(s[1]), int(s[2])) for s in spec]


def _is_sequential(model_config: dict[str, Any]) -> bool:
    """A Sequential model, or a model config with no input list (its layers run in a chain)."""
    cfg = model_config.get("config")
    listed = isinstance(cfg, dict) and "input_layers" in cfg
    return model_config.get("class_name") == "Sequential" or not listed


def sequential_input_shape(cfg: dict[str, Any], entries: list) -> list[int | None] | None:
    """A Sequential model's input shape (no batch axis): its first layer stating one, else its
    ``build_input_shape``; None where neither is stored."""
    for entry in entries:
        c = entry.get("config") or {}
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape:
            return list(shape[1:])
    build = cfg.get("build_input_shape")
    if build:
        return list(build[1:])
    return None


def _node_inputs(node: Any) -> tuple[list[Any], dict[str, Any]]:
    """(inputs, call kwargs) of one inbound node, Keras 3 (``{"args", "kwargs"}``) or Keras 2
    (``[[name, node, index, kwargs], ...]``) style; a list argument (merge layers) is spread."""
    if isinstance(node, dict):
        args: list[Any] = []
        for arg in node.get("args", []):
            items = arg if isinstance(arg, list) else [arg]
            args += [_keras3_arg(a) for a in items]
        return args, dict(node.get("kwargs") or {})
    args, kwargs = [], {}
    for item in node:
        args.append(Ref(item[0], int(item[1]), int(item[2])))
        if len(item) > 3 and isinstance(item[3], dict):
            kwargs.update(item[3])
    return args, kwargs


def _keras3_tensors(value: Any) -> list[Ref]:
    """The Keras 3 tensors anywhere inside ``value`` (a call's keyword arguments)."""
    if isinstance(value, dict) and value.get("class_name") == "__keras_tensor__":
        return [_keras3_arg(value)]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [ref for item in items for ref in _keras3_tensors(item)]


def _keras3_arg(arg: Any) -> Any:
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        layer, node, index = arg["config"]["keras_history"]
        return Ref(layer, int(node), int(index))
    return arg
