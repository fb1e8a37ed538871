"""An ONNX graph read as data: its constant tensors (initializers, ``Constant`` nodes, ``Identity``
aliases of them), and its weighted nodes as layers (Conv/ConvTranspose, Gemm, MatMul(+Add),
BatchNormalization, LayerNormalization, InstanceNormalization, LSTM/GRU/RNN) in execution order,
named where the exporter kept names, and what tells that BatchNorm was folded away.

Nothing is executed: this module reads the protobuf the ``onnx`` package parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import SourceFormatError, UnsupportedLayerError

# op -> {input position: variable name} of its weight inputs (constants); a callable names the
# variable from the node's attributes. Gemm's B is (out, in) with transB=1 (torch's Linear),
# (in, out) otherwise (a Keras Dense kernel).
OP_VARS: dict[str, dict[int, str | Callable[[dict[str, Any]], str]]] = {
    "Conv": {1: "weight", 2: "bias"},
    "ConvTranspose": {1: "weight", 2: "bias"},
    "Gemm": {1: lambda a: "weight" if a.get("transB", 0) else "kernel", 2: "bias"},
    "MatMul": {1: "kernel"},
    "BatchNormalization": {1: "gamma", 2: "beta", 3: "moving_mean", 4: "moving_variance"},
    "LayerNormalization": {1: "gamma", 2: "beta"},
    "InstanceNormalization": {1: "scale", 2: "B"},
    "LSTM": {1: "W", 2: "R", 3: "B"},
    "GRU": {1: "W", 2: "R", 3: "B"},
    "RNN": {1: "W", 2: "R", 3: "B"},
}
# ONNX attribute defaults that matter for the conversion (BatchNormalization's momentum is in the
# TF convention: running = running * momentum + batch * (1 - momentum)).
OP_DEFAULTS: dict[str, dict[str, Any]] = {
    "BatchNormalization": {"momentum": 0.9, "epsilon": 1e-5},
    "LayerNormalization": {"epsilon": 1e-5, "axis": -1},
    "InstanceNormalization": {"epsilon": 1e-5},
    "Gemm": {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0},
}
_BN_NAME = re.compile(r"(?i)batch_?norm|fusedbatchnorm")
_OPAQUE = re.compile(r"::|^val_\d+$|^[A-Za-z]*_?\d+$|:\d+$")


@dataclass
class OnnxLayer:
    """One weighted node: its name (the module the exporter's names say, else the node's), op,
    attributes, variables (-> keys in ``OnnxGraph.constants``), data inputs and tapped output."""

    name: str
    op: str
    node_name: str
    attrs: dict[str, Any]
    weights: dict[str, str]  # variable -> constant key
    data_inputs: tuple[str, ...]
    output: str
    name_origin: str  # "weights" (parameter names), "scope" (exporter scopes), "node" (opaque)
    scope_hint: str = ""  # the module the node's scope names, when the exporter recorded one
    metadata: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # variable -> shape


@dataclass
class OnnxNode:
    """Any node, for structure: op, name, inputs, outputs."""

    op: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class OnnxGraph:
    """What :func:`parse_graph` reads from a ModelProto."""

    producer: str
    producer_version: str
    opset: int
    nodes: list[OnnxNode]
    layers: list[OnnxLayer]
    constants: dict[str, tuple[tuple[int, ...], str, Callable[[], np.ndarray]]]
    inputs: list[tuple[str, list[int | str]]]
    outputs: list[str]
    ignored: dict[str, str] = field(default_factory=dict)
    constant_names: set[str] = field(default_factory=set)  # constants and their Identity aliases

    @property
    def exporter(self) -> str:
        return f"{self.producer or 'an unknown exporter'} {self.producer_version}".strip()

    def ops(self) -> set[str]:
        return {n.op for n in self.nodes}


def parse_graph(model: Any, path: Path) -> OnnxGraph:
    """Read ``model`` (a ModelProto loaded without its external data) into an OnnxGraph."""
    g = model.graph
    constants = _constants(model, path)
    aliases = _aliases(g, constants)
    nodes = [OnnxNode(n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in g.node]
    layers = _layers(g, constants, aliases)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    initial = {i.name for i in g.initializer}
    inputs = [(i.name, _dims(i)) for i in g.input if i.name not in initial]
    used = {key for lay in layers for key in lay.weights.values()}
    ignored = {
        k: "not a weight of a layer ckptport maps (shape constants, axes, ...)"
        for k in constants
        if k not in used
    }
    return OnnxGraph(
        model.producer_name,
        model.producer_version,
        opset,
        nodes,
        layers,
        {k: v for k, v in constants.items() if k in used},
        inputs,
        [o.name for o in g.output],
        ignored,
        set(constants) | set(aliases),
    )


def _dims(value_info: Any) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _constants(model: Any, path: Path) -> dict[str, tuple[tuple[int, ...], str, Callable]]:
    """Initializers and Constant-node tensors: key -> (shape, dtype, loader)."""
    from onnx import helper

    out = {}
    tensors = [(t.name, t) for t in model.graph.initializer]
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            tensors.append((n.output[0], n.attribute[0].t))
    for key, t in tensors:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
        out[key] = (tuple(int(d) for d in t.dims), dtype, _loader(t, path, key))
    return out


def _loader(tensor: Any, path: Path, key: str) -> Callable[[], np.ndarray]:
    """Loads one tensor; external data must lie in the model's directory and be long enough."""
    from onnx import numpy_helper

    external = {e.key: e.value for e in tensor.external_data}
    base = path.parent.resolve()
    if external:
        where = (base / external.get("location", "")).resolve()
        if base not in where.parents:
            raise SourceFormatError(
                f"{path}: tensor {key!r} points at external data {external.get('location')!r}"
                " outside the model's directory; refusing to read it"
            )

    def load() -> np.ndarray:
        if external:
            _check_external(path, key, base / external["location"], external)
        return numpy_helper.to_array(tensor, base_dir=str(base))

    return load


def _check_external(path: Path, key: str, where: Path, external: dict[str, str]) -> None:
    if not where.is_file():
        raise SourceFormatError(
            f"{path}: tensor {key!r} is stored in {where.name}, which is missing; copy it beside"
            " the .onnx file"
        )
    end = int(external.get("offset", 0)) + int(external.get("length", 0))
    if end > where.stat().st_size:
        raise SourceFormatError(
            f"{path}: external data file {where.name} is truncated (tensor {key!r} ends at byte"
            f" {end}, the file has {where.stat().st_size})"
        )


def _aliases(g: Any, constants: dict[str, Any]) -> dict[str, str]:
    """Identity outputs of constants (torch's exporter dedupes equal parameters this way): name
    seen by a node -> constant key."""
    out: dict[str, str] = {}
    for n in g.node:
        if n.op_type == "Identity" and n.input:
            src = out.get(n.input[0], n.input[0])
            if src in constants:
                out[n.output[0]] = src
    return out


def _layers(g: Any, constants: dict[str, Any], aliases: dict[str, str]) -> list[OnnxLayer]:
    """The weighted nodes in graph (execution) order; MatMul + Add(constant) is one layer."""
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers, seen = [], set()
    for n in g.node:
        if n.op_type not in OP_VARS:
            continue
        layer = _layer(n, constants, aliases, consumers)
        if layer is None:
            continue
        if layer.name in seen:
            layer.name = f"{layer.name}#{n.name or len(layers)}"
        seen.add(layer.name)
        layers.append(layer)
    return layers


def _layer(
    n: Any, constants: dict[str, Any], aliases: dict[str, str], consumers: dict[str, list]
) -> OnnxLayer | None:
    from onnx import helper

    attrs = {**OP_DEFAULTS.get(n.op_type, {})}
    attrs.update({a.name: _attr(helper.get_attribute_value(a)) for a in n.attribute})
    weights, seen_as, data = {}, [], []
    for pos, name in enumerate(n.input):
        key = aliases.get(name, name)
        var = OP_VARS[n.op_type].get(pos)
        if var is not None and key in constants:
            var = var(attrs) if callable(var) else var
            weights[var], _ = key, seen_as.append(name)
        elif name:
            data.append(name)
    if not weights:
        return None
    output = n.output[0]
    if n.op_type == "MatMul":
        output = _matmul_bias(n, constants, aliases, consumers, weights, seen_as) or output
    _check_supported(n, attrs)
    meta = {p.key: p.value for p in n.metadata_props}
    scope = _scope_hint(n.name, meta)
    name, origin = _layer_name(seen_as, scope, n)
    shapes = {var: constants[key][0] for var, key in weights.items()}
    return OnnxLayer(
        name, n.op_type, n.name, attrs, weights, tuple(data), output, origin, scope, meta, shapes
    )


def _attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [_attr(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.7g}")  # a float32 attribute: 0.9, not 0.8999999761581421
    if isinstance(value, (int, str)):
        return value
    return repr(value)


def _matmul_bias(n, constants, aliases, consumers, weights, seen_as) -> str | None:
    """A MatMul whose only consumer is an Add of a constant vector: that vector is its bias; the
    layer's output is then the Add's."""
    users = consumers.get(n.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = [i for i in add.input if i != n.output[0]]
    key = aliases.get(other[0], other[0]) if len(other) == 1 else None
    if key not in constants or len(constants[key][0]) != 1:
        return None
    weights["bias"] = key
    seen_as.append(other[0])
    return add.output[0]


def _check_supported(n: Any, attrs: dict[str, Any]) -> None:
    """Refuse what no PyTorch module computes (by name of the node and attribute)."""
    if n.op_type == "Gemm" and (attrs["alpha"] != 1.0 or attrs["beta"] != 1.0 or attrs["transA"]):
        raise UnsupportedLayerError(
            f"ONNX node {n.name!r} (Gemm) has alpha={attrs['alpha']}, beta={attrs['beta']},"
            f" transA={attrs['transA']}: a torch Linear computes only alpha=beta=1, transA=0"
        )
    if n.op_type == "BatchNormalization" and attrs.get("training_mode"):
        raise UnsupportedLayerError(
            f"ONNX node {n.name!r} is a training-mode BatchNormalization (training_mode=1); export"
            " the model in eval mode with BatchNorm kept (see `ckptport inspect`)"
        )


def _scope_hint(node_name: str, meta: dict[str, str]) -> str:
    """The module a node belongs to, as the exporter recorded it: torch dynamo's
    ``pkg.torch.onnx.name_scopes`` (the op itself last), or torch's TorchScript node names
    (``/layer1/layer1.0/conv1/Conv``: each level either extends the previous or adds a child)."""
    scopes = meta.get("pkg.torch.onnx.name_scopes")
    if scopes:
        parts = [p.strip(" '\"") for p in scopes.strip("[]").split(",")]
        parts = [p for p in parts[:-1] if p]
        return parts[-1] if parts else ""
    if not node_name.startswith("/"):
        return ""
    path, prev = "", ""
    for seg in node_name.strip("/").split("/")[:-1]:
        extends = prev and seg.startswith(prev + ".")
        path = path + seg[len(prev) :] if extends else (f"{path}.{seg}" if path else seg)
        prev = seg
    return path


def _layer_name(seen_as: list[str], scope: str, n: Any) -> tuple[str, str]:
    """(name, origin): the module the parameter names share (``layer1.0.conv1.weight`` ->
    ``layer1.0.conv1``), else the exporter's scope for the node, else the node's own name."""
    prefixes = {s.rpartition(".")[0] for s in seen_as}
    if len(prefixes) == 1 and all("." in s and not _OPAQUE.search(s) for s in seen_as):
        return prefixes.pop(), "weights"
    if scope:
        return scope, "scope"
    return n.name or f"{n.op_type}_{n.output[0]}", "node"


# ------------------------------------------------------------------ folded BatchNorm


@dataclass
class FoldedBN:
    """Evidence that the exporter folded BatchNorm into the convolutions."""

    exporter: str
    evidence: str
    certain: bool

    def message(self, label: str) -> str:
        advice = fold_advice(self.exporter)
        return (
            f"{label}: BatchNorm was folded into the convolutions by {self.exporter}"
            f" ({self.evidence}): the model has no BatchNorm statistics or momentum left, so"
            " fine-tuning it trains convolutions whose outputs are no longer normalised; "
            f"{advice}"
        )


FOLD_ADVICE = {
    "pytorch": (
        "to keep BatchNorm, export with torch.onnx.export(model, args, f, dynamo=True,"
        " optimize=False), or with the TorchScript exporter (dynamo=False)"
        " training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False"
    ),
    "tf2onnx": (
        "tf2onnx always runs TensorFlow's constant folding (Grappler 'constfold', which no tf2onnx"
        " option turns off), and that merges inference-mode BatchNorm into the conv weights:"
        " convert the Keras model itself (.keras, .weights.h5, SavedModel) with ckptport instead"
    ),
}


def fold_advice(exporter: str) -> str:
    for producer, advice in FOLD_ADVICE.items():
        if exporter.startswith(producer):
            return advice
    return "re-export with BatchNorm kept (the exporter's training or no-folding option)"


def folded_bn(graph: OnnxGraph) -> FoldedBN | None:
    """How we know BatchNorm was folded away, if we do: no BatchNormalization node, and a conv
    whose node says it computes a BatchNorm (torch dynamo's scopes, TF op names), or conv weights
    the exporter renamed to fresh constants while the other parameters kept their names (torch's
    TorchScript exporter in eval mode), or a tf2onnx export whose convolutions carry biases."""
    if "BatchNormalization" in graph.ops():
        return None
    convs = [lay for lay in graph.layers if lay.op in ("Conv", "ConvTranspose")]
    if not convs:
        return None
    exporter = graph.exporter
    named = [
        lay for lay in convs if _BN_NAME.search(lay.node_name + lay.metadata.get("namespace", ""))
    ]
    if named:
        return FoldedBN(
            exporter,
            f"{len(named)} of {len(convs)} Conv nodes are named after a BatchNorm, e.g."
            f" {named[0].node_name!r}",
            True,
        )
    renamed = [lay for lay in convs if re.match(r"onnx::Conv_\d+$", lay.weights["weight"])]
    if renamed and any(lay.name_origin == "weights" for lay in graph.layers):
        return FoldedBN(
            exporter,
            f"{len(renamed)} of {len(convs)} Conv weights were replaced by new constants"
            f" ({renamed[0].weights['weight']!r}) while other parameters kept their names",
            True,
        )
    biased = [lay for lay in convs if "bias" in lay.weights]
    if graph.producer == "tf2onnx" and biased:
        return FoldedBN(
            exporter,
            f"no BatchNormalization node, and {len(biased)} of {len(convs)} Conv nodes carry a"
            " bias, as folding leaves them",
            False,
        )
    return None
