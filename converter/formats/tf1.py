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

__all__ = ["bn_settings", "prepare_name_based", "infer_config", "use_shadows"]

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
    settings = bn_settings(meta) if meta is not None else {}
    raw.fallback_config = infer_config(raw, settings, meta)


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
    if {"moving_mean", "moving_variance"} <= set(vars_):
        return "BatchNormalization"
    if "depthwise_kernel" in vars_:
        return "SeparableConv2D" if "pointwise_kernel" in vars_ else "DepthwiseConv2D"
    rank = len(vars_.get("kernel", ()))
    return {2: "Dense", 3: "Conv1D", 4: "Conv2D", 5: "Conv3D"}.get(rank, "Layer")


def _layer_config(name: str, cls: str, vars_: dict[str, tuple[int, ...]], bn: dict) -> dict:
    cfg: dict[str, Any] = {"name": name}
    kernel = vars_.get("kernel")
    if cls == "BatchNormalization":
        cfg.update(center="beta" in vars_, scale="gamma" in vars_, axis=-1)
        cfg.update(momentum=bn.get("momentum"), epsilon=bn.get("epsilon", 1e-3))
    elif cls == "Dense" and kernel:
        cfg.update(units=kernel[-1], use_bias="bias" in vars_)
    elif cls.startswith("Conv") and kernel:
        cfg.update(filters=kernel[-1], kernel_size=list(kernel[:-2]), use_bias="bias" in vars_)
    elif cls in ("DepthwiseConv2D", "SeparableConv2D"):
        cfg.update(kernel_size=list(vars_["depthwise_kernel"][:2]), use_bias="bias" in vars_)
    return cfg


def infer_config(raw: RawCheckpoint, settings: dict[str, dict], meta: Path | None) -> dict:
    """A model config (layers only, no connections) from ``<layer>/<variable>`` names, in the
    order the names sort; BN momentum None where the ``.meta`` graph does not give it."""
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in raw.tensors.items():
        layer, _, var = key.rpartition("/")
        groups.setdefault(layer, {})[var.split(":")[0]] = tuple(t.shape)
    layers, unknown, no_eps = [], [], []
    for name, vars_ in groups.items():
        cls = _layer_class(vars_)
        cfg = _layer_config(name, cls, vars_, settings.get(name, {}))
        if cls == "BatchNormalization" and cfg["momentum"] is None:
            unknown.append(name)
        if cls == "BatchNormalization" and "epsilon" not in settings.get(name, {}):
            no_eps.append(name)
        layers.append({"class_name": cls, "name": name, "config": cfg})
    if settings:
        raw.notes.append(f"BatchNorm momentum/eps read from {meta.name}")
    if unknown:
        raw.notes.append(
            f"BatchNorm momentum of {len(unknown)} layers is not in the checkpoint"
            + (f" nor in {meta.name}" if meta else " and there is no .meta graph beside it")
        )
    if no_eps:
        raw.notes.append(
            f"BatchNorm eps of {len(no_eps)} layers ({', '.join(no_eps[:3])}) is not recorded:"
            " 1e-3 assumed (the tf.compat.v1.layers/Keras default)"
        )
    return {"class_name": "Functional", "config": {"name": "tf1", "layers": layers}}


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


def _nodes(meta: Path) -> dict[str, tuple[str, list[str], dict[str, bytes]]]:
    graph = pw.first(meta.read_bytes(), 2)
    out = {}
    for node in pw.repeated(graph if isinstance(graph, bytes) else b"", 1):
        attrs = {pw.text(e, 1): (pw.first(e, 2) or b"") for e in pw.repeated(node, 5)}
        inputs = [i.decode(errors="replace").split(":")[0] for i in pw.repeated(node, 3)]
        out[pw.text(node, 1)] = (pw.text(node, 2), inputs, attrs)
    return out


def bn_settings(meta: Path) -> dict[str, dict[str, float]]:
    """BatchNorm scope -> {"momentum": m, "epsilon": e} as far as the ``.meta`` graph says."""
    try:
        nodes = _nodes(meta)
    except pw.ProtoError as exc:
        raise SourceFormatError(f"{meta} is not a readable MetaGraphDef ({exc})") from exc
    consts = {n: _const_value(a) for n, (op, _, a) in nodes.items() if op == "Const"}
    out: dict[str, dict[str, float]] = {}
    for name, (op, inputs, attrs) in nodes.items():
        if m := _FUSED.match(name):
            found = {"epsilon": _attr_float(attrs, "epsilon")}
            factor = _attr_float(attrs, "exponential_avg_factor")
            if factor is not None and factor != 1.0:
                found["momentum"] = 1.0 - factor
        elif (m := _MOVING_AVG.match(name)) and m["what"] == "decay" and consts.get(name):
            found = {"momentum": 1.0 - consts[name]}
        elif m and m["what"] == "sub" and len(inputs) == 2 and consts.get(inputs[0]) == 1.0:
            found = {"momentum": consts.get(inputs[1])}
        elif m := _EPS_CONST.match(name):
            found = {"epsilon": consts.get(name)}
        else:
            continue
        scope = out.setdefault(m["scope"], {})
        for k, v in found.items():
            if v is not None:
                scope.setdefault(k, float(f"{v:.7g}"))  # float32 constants, 7 digits
    return out
