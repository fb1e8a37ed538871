"""TF1 name-based checkpoints as published (``tf.compat.v1.train.Saver``): optimizer slots and
bookkeeping left out, ExponentialMovingAverage shadows kept aside (``--use-ema``), BatchNorm
momentum and eps read from the ``.meta`` graph next to the bundle, and a layer list inferred from
the variable names for sources no shipped architecture fits. Never imports TensorFlow.

The ``.meta`` file is a MetaGraphDef (graph_def = 2 -> GraphDef node = 1 -> NodeDef name = 1,
op = 2, input = 3, attr = 5 (map: key = 1, value = 2 -> AttrValue f = 4, tensor = 8 -> TensorProto
dtype = 1, tensor_content = 4, float_val = 5, double_val = 6)). A BatchNorm's momentum m is there
as ``<layer>/AssignMovingAvg/decay`` = 1 - m (``moving_averages.assign_moving_average``: slim,
tf.contrib), as ``<layer>/AssignMovingAvg/sub`` = 1 - Const(m) (tf.compat.v1.layers, tf.keras in
graph mode), or as a ``FusedBatchNorm*`` node's ``exponential_avg_factor`` = 1 - m; its eps is the
``FusedBatchNorm*`` ``epsilon`` attribute or ``<layer>/batchnorm/add/y``.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import SourceFormatError
from . import RawCheckpoint, protowire as pw

__all__ = ["graph_facts", "bn_settings", "prepare_name_based", "infer_config", "use_shadows"]

_SLOT = re.compile(
    r"/(Adam|Adam_1|Momentum|RMSProp|RMSProp_1|Adagrad|AdagradDA|Adadelta|Adadelta_1|Ftrl|Ftrl_1"
    r"|Nadam|Nadam_1|Adamax|Adamax_1|LARSOptimizer|ProximalAdagrad)$"
)
_BOOKKEEPING = re.compile(r"^(global_step|beta[12]_power(_\d+)?)$")
_KERAS_OPTIMIZER = re.compile(
    r"^(training/)?(Adam|SGD|RMSprop|Adagrad|Adadelta|Adamax|Nadam|Ftrl|Momentum)/"
)
_EMA = "/ExponentialMovingAverage"
_FUSED = re.compile(r"^(?P<scope>.+)/FusedBatchNorm(V2|V3)?$")
_MOVING_AVG = re.compile(r"^(?P<scope>.+)/AssignMovingAvg(_\d+)?/(?P<what>decay|sub)$")
_EPS_CONST = re.compile(r"^(?P<scope>.+)/batchnorm/add/y$")
_CONV_OPS = ("Conv2D", "DepthwiseConv2dNative", "Conv1D")
_CONV_NODE = re.compile(r"^(?P<scope>.+)/(Conv2D|depthwise|convolution|conv1d)(_\d+)?$")
_COND = re.compile(r"^(?P<scope>.+)/cond(_\d+)?$")  # tf.cond(training, ...) in a BN layer
_COND_SUFFIX = re.compile(r"/cond(_\d+)?$")  # v1 control flow: <layer>/cond/FusedBatchNorm


def prepare_name_based(raw: RawCheckpoint, prefix: Path) -> None:
    """Leave optimizer state and bookkeeping out (counted in a note), keep EMA shadows aside, and
    infer the layer list (BN settings from the ``.meta`` graph when there is one)."""
    dropped: Counter[str] = Counter()
    for key in list(raw.tensors):
        base, _, last = key.rpartition("/")
        if key.endswith(_EMA) and key[: -len(_EMA)] in raw.tensors:
            raw.shadows[key[: -len(_EMA)]] = raw.tensors.pop(key)
            raw.ignored[key] = "ExponentialMovingAverage shadow (--use-ema takes it)"
        elif _SLOT.search(key) and base in raw.tensors:
            dropped[f"{re.sub(r'_1$', '', last)} slots"] += 1
            raw.ignored[key] = f"optimizer slot ({last}) of {base}"
            del raw.tensors[key]
        elif _BOOKKEEPING.match(key) or _KERAS_OPTIMIZER.match(key):
            dropped[key if _BOOKKEEPING.match(key) else "optimizer state"] += 1
            raw.ignored[key] = "optimizer state or training bookkeeping"
            del raw.tensors[key]
    if dropped:
        raw.notes.append(
            f"dropped {sum(dropped.values())} variables that are not model state: "
            + ", ".join(f"{n} {what}" if n > 1 else what for what, n in sorted(dropped.items()))
        )
    if raw.shadows:
        raw.notes.append(
            f"{len(raw.shadows)} ExponentialMovingAverage shadow values present, not used"
            " (--use-ema takes them)"
        )
    meta = prefix_meta(prefix)
    order, settings = {}, {}
    if meta is not None:
        try:
            order, settings = graph_facts(meta)
        except SourceFormatError as exc:  # the weights are still readable: say so, go on
            raw.notes.append(f"{exc}: its BatchNorm settings and layer order are not used")
            meta = None
    raw.fallback_config = infer_config(raw, settings, meta, order)


def prefix_meta(prefix: Path) -> Path | None:
    from .tf_bundle import bundle_path

    meta = bundle_path(prefix, ".meta")
    return meta if meta.is_file() else None


def use_shadows(raw: RawCheckpoint) -> int:
    """Take the ExponentialMovingAverage shadow values instead of the raw variables; returns how
    many were replaced (variables without a shadow, e.g. BN moving statistics, stay)."""
    if not raw.shadows:
        raise SourceFormatError(
            f"{raw.path}: --use-ema, but the checkpoint holds no .../ExponentialMovingAverage"
            " shadow variables; convert without --use-ema"
        )
    for key, shadow in raw.shadows.items():
        raw.tensors[key] = shadow
    kept = len(raw.tensors) - len(raw.shadows)
    raw.notes.append(
        f"--use-ema: {len(raw.shadows)} variables from their ExponentialMovingAverage shadows"
        + (f", {kept} without one used as saved" if kept else "")
    )
    return len(raw.shadows)


# ------------------------------------------------------------------ the layer list


def _layer_class(vars_: dict[str, tuple[int, ...]]) -> str:
    """A Keras class from a layer's variable names (Keras/tf.layers names, or TF-slim's
    ``weights``/``biases``/``depthwise_weights``) and the kernel's rank."""
    if {"moving_mean", "moving_variance"} <= set(vars_):
        return "BatchNormalization"
    if "depthwise_weights" in vars_:
        return "DepthwiseConv2D"
    if "depthwise_kernel" in vars_:
        return "SeparableConv2D" if "pointwise_kernel" in vars_ else "DepthwiseConv2D"
    rank = len(vars_.get("kernel", vars_.get("weights", ())))
    return {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(rank, "Layer")


def _layer_config(name: str, cls: str, vars_: dict[str, tuple[int, ...]], bn: dict) -> dict:
    cfg: dict[str, Any] = {"name": name}
    kernel = vars_.get("kernel", vars_.get("weights"))
    bias = "bias" in vars_ or "biases" in vars_
    if cls == "BatchNormalization":
        cfg.update(center="beta" in vars_, scale="gamma" in vars_, axis=-1)
        cfg.update(momentum=bn.get("momentum"), epsilon=bn.get("epsilon", 1e-3))
    elif cls == "Dense" and kernel:
        cfg.update(units=kernel[-1], use_bias=bias)
    elif cls.startswith("Conv") and kernel:
        cfg.update(filters=kernel[-1], kernel_size=list(kernel[:-2]), use_bias=bias)
        cfg.update({k: bn[k] for k in ("strides", "padding") if k in bn})
    elif cls in ("DepthwiseConv2D", "SeparableConv2D"):
        dw = vars_.get("depthwise_kernel", vars_.get("depthwise_weights", ()))
        cfg.update(kernel_size=list(dw[:2]), depth_multiplier=dw[-1] if dw else 1, use_bias=bias)
        cfg.update({k: bn[k] for k in ("strides", "padding") if k in bn})
    return cfg


def infer_config(
    raw: RawCheckpoint, settings: dict[str, dict], meta: Path | None, order: dict[str, int]
) -> dict:
    """A model config (layers only, no connections) from ``<layer>/<variable>`` names, in the
    order the ``.meta`` graph created the variables (else the order the names sort); conv
    strides/padding and BN momentum/eps from the graph, BN momentum None where it does not say.
    Its ``notes`` say so; they apply only when the source is read by this config."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in raw.tensors.items():
        layer, _, var = key.rpartition("/")
        groups.setdefault(layer, {})[var.split(":")[0]] = tuple(t.shape)
    first = {n: min(order.get(f"{n}/{v}", len(order)) for v in vs) for n, vs in groups.items()}
    layers, unknown, no_eps, notes = [], [], [], []
    for name in sorted(groups, key=lambda n: first[n]):  # stable: sorted names when no graph
        vars_ = groups[name]
        cls = _layer_class(vars_)
        cfg = _layer_config(name, cls, vars_, settings.get(name, {}))
        if cls == "BatchNormalization" and cfg["momentum"] is None:
            unknown.append(name)
        if cls == "BatchNormalization" and "epsilon" not in settings.get(name, {}):
            no_eps.append(name)
        layers.append({"class_name": cls, "name": name, "config": cfg})
    if settings and meta is not None:
        notes.append(f"BatchNorm momentum/eps read from {meta.name}")
    if unknown:
        notes.append(
            f"BatchNorm momentum of {len(unknown)} layers is not in the checkpoint"
            + (f" nor in {meta.name}" if meta else " and there is no .meta graph beside it")
        )
    if no_eps:
        notes.append(
            f"BatchNorm eps of {len(no_eps)} layers ({', '.join(no_eps[:3])}) is not recorded:"
            " 1e-3 assumed (the tf.compat.v1.layers/Keras default)"
        )
    config = {"name": "tf1", "layers": layers}
    return {"class_name": "Functional", "config": config, "notes": notes}


# ------------------------------------------------------------------ the .meta graph


def _const_value(attrs: dict[str, bytes]) -> float | None:
    tensor = pw.first(attrs.get("value", b""), 8)
    if not isinstance(tensor, bytes):
        return None
    fm = pw.field_map(tensor)
    dtype = fm.get(1, [(0, 1)])[0][1]
    for wire, value in fm.get(5, []):  # float_val
        vals = pw.as_float(wire, value)
        if len(vals) == 1:
            return vals[0]
    for wire, value in fm.get(6, []):  # double_val
        if wire == 1 and isinstance(value, int):
            return struct.unpack("<d", value.to_bytes(8, "little"))[0]
    content = fm.get(4, [(2, b"")])[0][1]
    if dtype == 1 and isinstance(content, bytes) and len(content) == 4:
        return struct.unpack("<f", content)[0]
    return None


def _attr_float(attrs: dict[str, bytes], name: str) -> float | None:
    for wire, value in pw.field_map(attrs.get(name, b"")).get(4, []):
        vals = pw.as_float(wire, value)
        if vals:
            return vals[0]
    return None


Node = tuple[str, list[str], dict[str, bytes]]  # op, inputs, attrs


def _node_defs(container: bytes, field: int) -> dict[str, Node]:
    out = {}
    for node in pw.repeated(container, field):
        attrs = {pw.text(e, 1): (pw.first(e, 2) or b"") for e in pw.repeated(node, 5)}
        inputs = [i.decode(errors="replace").split(":")[0] for i in pw.repeated(node, 3)]
        out[pw.text(node, 1)] = (pw.text(node, 2), inputs, attrs)
    return out


def _graph(meta: Path) -> tuple[dict[str, Node], dict[str, dict[str, Node]]]:
    """The graph's nodes, and its function library (``tf.cond`` branches in TF2-built graphs:
    GraphDef library = 2 -> function = 1 -> FunctionDef signature = 1 (name = 1), node_def = 3)."""
    graph = pw.first(meta.read_bytes(), 2)
    graph = graph if isinstance(graph, bytes) else b""
    library = pw.first(graph, 2)
    functions = {}
    for fn in pw.repeated(library if isinstance(library, bytes) else b"", 1):
        signature = pw.first(fn, 1)
        name = pw.text(signature, 1) if isinstance(signature, bytes) else ""
        functions[name] = _node_defs(fn, 3)
    return _node_defs(graph, 1), functions


def _branches(attrs: dict[str, bytes], functions: dict[str, dict[str, Node]]) -> list[dict]:
    """The then/else functions of an If/StatelessIf node (AttrValue func = 10 -> name = 1)."""
    out = []
    for key in ("then_branch", "else_branch"):
        func = pw.first(attrs.get(key, b""), 10)
        out.append(functions.get(pw.text(func, 1), {}) if isinstance(func, bytes) else {})
    return out


def _consts(nodes: dict[str, Node], prefix: str = "") -> list[float]:
    return [
        v
        for name, (op, _, attrs) in nodes.items()
        if op == "Const" and name.startswith(prefix) and (v := _const_value(attrs)) is not None
    ]


def _momentum_input(name: str, nodes: dict[str, Node], functions: dict) -> float | None:
    """The momentum fed to ``1 - momentum`` (tf.compat.v1.layers): a Const, or the training
    branch of a ``tf.cond(training, momentum, 1.0)`` (v1 Switch/Merge consts, or a TF2 If's
    branch functions): the one constant other than 1.0."""
    op, inputs, attrs = nodes.get(name, ("", [], {}))
    if op == "Const":
        return _const_value(attrs)
    if op == "Merge":
        found = [v for v in _consts(nodes, name.rsplit("/", 1)[0] + "/") if v != 1.0]
    elif op == "Identity" and inputs and nodes.get(inputs[0], ("",))[0] in ("If", "StatelessIf"):
        branches = _branches(nodes[inputs[0]][2], functions)
        found = [v for b in branches for v in _consts(b) if v != 1.0]
    else:
        return None
    return found[0] if len(found) == 1 else None


def _fused(attrs: dict[str, bytes]) -> dict[str, float | None]:
    found = {"epsilon": _attr_float(attrs, "epsilon")}
    factor = _attr_float(attrs, "exponential_avg_factor")
    if factor is not None and factor != 1.0:
        found["momentum"] = 1.0 - factor
    return found


def _bn_facts(name: str, node: Node, nodes: dict[str, Node], functions: dict) -> tuple | None:
    """(BN scope, what this node says about it), or None."""
    op, inputs, attrs = node
    if m := _FUSED.match(name):
        return m["scope"], _fused(attrs)
    if m := _MOVING_AVG.match(name):
        if m["what"] == "decay" and op == "Const":
            value = _const_value(attrs)
            return m["scope"], {"momentum": None if value is None else 1.0 - value}
        if len(inputs) == 2 and _momentum_input(inputs[0], nodes, functions) == 1.0:
            return m["scope"], {"momentum": _momentum_input(inputs[1], nodes, functions)}
        return None
    if m := _EPS_CONST.match(name):
        return m["scope"], {"epsilon": _const_value(attrs)}
    if (m := _COND.match(name)) and op in ("If", "StatelessIf"):
        for branch in _branches(attrs, functions):
            for inner, (iop, _, iattrs) in branch.items():
                if iop.startswith("FusedBatchNorm"):
                    return m["scope"], _fused(iattrs)
    return None


def graph_facts(meta: Path) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """The ``.meta`` graph's node order (creation order: variables are nodes named like them) and
    per layer scope what it says: BN momentum/epsilon, conv strides/padding."""
    try:
        nodes, functions = _graph(meta)
    except pw.ProtoError as exc:
        raise SourceFormatError(f"{meta} is not a readable MetaGraphDef ({exc})") from exc
    settings: dict[str, dict[str, Any]] = bn_settings(nodes, functions)
    for name, (op, _, attrs) in nodes.items():
        if op in _CONV_OPS and (m := _CONV_NODE.match(name)):
            for k, v in _conv_attrs(attrs).items():
                settings.setdefault(m["scope"], {}).setdefault(k, v)
    return {name: i for i, name in enumerate(nodes)}, settings


def _conv_attrs(attrs: dict[str, bytes]) -> dict[str, Any]:
    """strides (AttrValue list = 1 -> ListValue i = 3) and padding (AttrValue s = 2) of an NHWC
    convolution, the way a Keras config says them."""
    out: dict[str, Any] = {}
    ints = [i for w, v in pw.field_map(attrs.get("strides", b"")).get(1, []) for i in (
        [x for lw, lv in pw.field_map(v).get(3, []) for x in pw.as_ints(lw, lv)]
        if isinstance(v, bytes) else [])]  # fmt: skip
    if len(ints) == 4:
        out["strides"] = ints[1:3]
    padding = pw.first(attrs.get("padding", b""), 2)
    if isinstance(padding, bytes) and padding in (b"SAME", b"VALID"):
        out["padding"] = padding.decode().lower()
    return out


def bn_settings(
    nodes: dict[str, Node], functions: dict[str, dict[str, Node]]
) -> dict[str, dict[str, Any]]:
    """BatchNorm scope -> {"momentum": m, "epsilon": e} as far as the graph says."""
    out: dict[str, dict[str, Any]] = {}
    for name, node in nodes.items():
        facts = _bn_facts(name, node, nodes, functions)
        if facts is None:
            continue
        scope = out.setdefault(_COND_SUFFIX.sub("", facts[0]), {})
        for k, v in facts[1].items():
            if v is not None:
                scope.setdefault(k, float(f"{v:.7g}"))  # float32 constants, 7 digits
    return out
