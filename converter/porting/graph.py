"""The Keras graph of a stored model config, as calls in order: which layer runs on which tensors.

Reads Keras 3 (``.keras``) and Keras 2 style (legacy ``.h5``) configs, Functional and Sequential,
and inlines nested models (a Sequential block or an application used as a layer): their layers
become calls of the outer graph, wired to the tensors the nested model was called on. Nothing is
deserialized: this reads the JSON only, so a Lambda's stored code is never loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SourceFormatError, UnsupportedLayerError

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

    @property
    def tensors(self) -> list[Ref]:
        return [r for r in self.inputs if isinstance(r, Ref)]


@dataclass
class Graph:
    """The model's inputs (name, Keras shape without batch, dtype), its calls in order, its
    outputs; ``shared``: layers called more than once."""

    inputs: list[tuple[Ref, list[int | None], str]]
    calls: list[Call]
    outputs: list[Ref]

    @property
    def shared(self) -> set[str]:
        seen: dict[str, int] = {}
        for call in self.calls:
            seen[call.layer] = seen.get(call.layer, 0) + 1
        return {name for name, n in seen.items() if n > 1}


def read_graph(model_config: dict[str, Any], label: str) -> Graph:
    """The graph of a stored model config (``model_config`` of a ``.keras`` or legacy ``.h5``)."""
    if model_config.get("class_name") not in MODEL_CLASSES:
        raise SourceFormatError(
            f"{label}: the stored config is a {model_config.get('class_name')!r}, not a Keras"
            " Functional or Sequential model"
        )
    walk = _Walk(label)
    inputs = walk.model_inputs(model_config)
    outputs = walk.model(model_config, [ref for ref, _, _ in inputs], "")
    return Graph(inputs, walk.calls, outputs)


class _Walk:
    """Walks a model config, nested models inlined; ``alias`` maps a nested model's own tensors
    (its inputs, its outputs as seen from outside) to the tensors they stand for."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls: list[Call] = []
        self.alias: dict[Ref, Ref] = {}

    def model_inputs(self, model_config: dict[str, Any]) -> list[tuple[Ref, list, str]]:
        cfg = model_config["config"]
        entries = _layers(cfg)
        if model_config["class_name"] == "Sequential":
            shape = _sequential_input_shape(cfg, entries, self.label)
            return [(Ref(_layer_name(cfg) + "_input"), shape, "float32")]
        by_name = {_layer_name(e): e for e in entries}
        out = []
        for ref in _refs(cfg.get("input_layers")):
            entry_cfg = by_name[ref.layer].get("config", {})
            shape = entry_cfg.get("batch_shape") or entry_cfg.get("batch_input_shape")
            out.append((ref, list(shape[1:]), str(entry_cfg.get("dtype", "float32"))))
        return out

    def model(self, model_config: dict[str, Any], inputs: list[Ref], prefix: str) -> list[Ref]:
        """Add the calls of one (possibly nested) model fed by ``inputs``; its output tensors."""
        cfg = model_config["config"]
        if model_config["class_name"] == "Sequential":
            return [self._sequential(cfg, inputs[0])]
        own_inputs = _refs(cfg.get("input_layers"))
        if len(own_inputs) != len(inputs):
            raise UnsupportedLayerError(
                f"{self.label}: nested model {_layer_name(cfg)!r} takes {len(own_inputs)} inputs,"
                f" called with {len(inputs)}"
            )
        self.alias.update((a, b) for a, b in zip(own_inputs, inputs) if a != b)
        for entry in _layers(cfg):
            if entry.get("class_name") != "InputLayer":
                self._entry(entry)
        return [self.resolve(r) for r in _refs(cfg.get("output_layers"))]

    def _sequential(self, cfg: dict[str, Any], x: Ref) -> Ref:
        for entry in _layers(cfg):
            if entry.get("class_name") == "InputLayer":
                continue
            x = self._call(entry, [x], {}, 0)
        return x

    def _entry(self, entry: dict[str, Any]) -> None:
        for node_index, node in enumerate(entry.get("inbound_nodes") or []):
            args, kwargs = _node_inputs(node)
            resolved = [self.resolve(a) if isinstance(a, Ref) else a for a in args]
            self._call(entry, resolved, kwargs, node_index)

    def resolve(self, ref: Ref) -> Ref:
        while ref in self.alias:
            ref = self.alias[ref]
        return ref

    def _call(self, entry: dict[str, Any], inputs: list[Any], kwargs: dict, node: int) -> Ref:
        name, cls = _layer_name(entry), entry.get("class_name", "")
        cfg = entry.get("config") or {}
        if cls in MODEL_CLASSES or (isinstance(cfg, dict) and "layers" in cfg):
            outs = self.model(entry, [i for i in inputs if isinstance(i, Ref)], name)
            for k, out in enumerate(outs):
                self.alias[Ref(name, node, k)] = out
            return outs[0]
        is_op = is_op_entry(entry)
        out = Ref(name, node, 0)
        self.calls.append(Call(name, cls, cfg, inputs, out, kwargs, is_op))
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


def _layer_name(entry: dict[str, Any]) -> str:
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


def _sequential_input_shape(cfg: dict[str, Any], entries: list, label: str) -> list[int | None]:
    for entry in entries:
        c = entry.get("config") or {}
        shape = c.get("batch_shape") or c.get("batch_input_shape")
        if shape:
            return list(shape[1:])
    build = cfg.get("build_input_shape")
    if build:
        return list(build[1:])
    raise SourceFormatError(f"{label}: the Sequential model declares no input shape")


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


def _keras3_arg(arg: Any) -> Any:
    if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
        layer, node, index = arg["config"]["keras_history"]
        return Ref(layer, int(node), int(index))
    return arg
