"""ONNX sources: an ONNX graph's weighted nodes as source layers, mapped onto a torchvision/timm
target or the user's module by the names the exporter kept (``layer1.0.conv1.weight``, or the
node's recorded scope), and converted by the ordinary pipeline with a table made for the file:
one explicit rule per layer (ONNX op -> named transform, see ``onnx_transforms.OP_TRANSFORMS``).

BatchNorm folded away by the exporter is detected (:func:`converter.onnx_graph.folded_bn`) and
refused unless the user accepts identity statistics (``accept_folded_bn``): each target BatchNorm
after a folded conv then gets weight 1, running mean 0, running var ``1 - eps`` (so that it computes
the identity) and the folded conv's bias as its bias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import onnx_transforms  # noqa: F401  (registers the ONNX-op layer transforms)
from .errors import MappingError, UnknownArchitectureError, UnsupportedLayerError, option
from .formats import RawCheckpoint, RawTensor
from .source import SourceLayer, SourceModel
from .specs import parse_spec
from .tables import Rule, Table, Variant

FOLDED_FLAG = option("accept_folded_bn=True")  # --accept-folded-bn in the CLI


@dataclass
class OnnxPlan:
    """An ONNX source and how its layers map: layer -> target module, the table that does it."""

    source: SourceModel
    table: Table
    variant: Variant
    target_manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    detected: bool = False  # the target was found from the layer names (no --to)
    folded: bool = False  # BN folded by the exporter, accepted with identity statistics


def onnx_source(raw: RawCheckpoint) -> SourceModel:
    """The graph's weighted nodes as source layers (class: the ONNX op; config: its attributes)."""
    layers = []
    for i, lay in enumerate(raw.graph.layers):
        weights = {var: raw.tensors[key] for var, key in lay.weights.items()}
        layers.append(
            SourceLayer(lay.name, lay.op, dict(lay.attrs), "file", weights, dict(lay.weights), i)
        )
    return SourceModel(raw, layers, None, "file")


def target_modules(manifest: dict[str, Any]) -> dict[str, set[str]]:
    """Target module -> its parameter/buffer names (from a target manifest)."""
    out: dict[str, set[str]] = {}
    for t in manifest["tensors"]:
        module, _, param = t["key"].rpartition(".")
        out.setdefault(module, set()).add(param)
    return out


def by_names(source: SourceModel, manifest: dict[str, Any]) -> dict[str, str] | None:
    """Layer -> target module where every layer's name is a module of the target, else None."""
    modules = target_modules(manifest)
    named = {lay.name: lay.name for lay in source.layers if lay.name in modules}
    return named if len(named) == len(source.layers) else None


def detect_targets(source: SourceModel) -> list[str]:
    """The shipped torchvision/timm targets whose modules are exactly the layers' names (an export
    of that model that kept its parameter names), torchvision's first (timm's ResNets share its
    names and computation)."""
    import json

    from .manifest import manifest_dir

    names = {lay.name for lay in source.layers}
    found = []
    for lib in ("torchvision", "timm"):
        for path in sorted(manifest_dir().glob(f"{lib}.*.json")):
            manifest = json.loads(path.read_text())
            if _weighted_modules(manifest) == names:
                found.append(manifest["id"])
    return found


def _weighted_modules(manifest: dict[str, Any]) -> set[str]:
    return {
        t["key"].rpartition(".")[0]
        for t in manifest["tensors"]
        if not t["key"].endswith("num_batches_tracked")
    }


def plan(
    raw: RawCheckpoint, to: str | None, accept_folded_bn: bool = False, mapping: Any = None
) -> OnnxPlan:
    """Resolve the source, the target, the layer -> module map and the table that applies it."""
    from .onnx_graph import folded_bn
    from .pipeline import target_manifest_for

    source = onnx_source(raw)
    _also: list[str] = []
    found: list[str] = []
    if to is None:
        found = detect_targets(source)
        to, _also = (found[0], found[1:]) if found else (None, [])
    if to is None:
        raise UnknownArchitectureError(
            f"{raw.path} (ONNX, {len(source.layers)} weighted nodes) names no shipped"
            " torchvision/timm model; pass --to timm:NAME, torchvision:NAME (the class count"
            " follows the source's classifier) or file.py:factory"
        )
    variant = Variant(None, to)
    manifest = target_manifest_for(variant, {})
    notes = [f"also fits {', '.join(also)}: the same modules" for also in [_also] if also]
    missing_bn = _missing_bn(source, manifest)
    if missing_bn:
        _refuse_folded(raw, folded_bn(raw.graph), missing_bn, accept_folded_bn)
    modules = mapping or by_names(source, manifest)
    classes = class_count(source, modules, manifest) if modules and mapping is None else None
    if classes is not None and parse_spec(to).is_library:  # torchvision/timm: num_classes=N
        variant = Variant(None, to, target_kwargs={"num_classes": classes})
        manifest = target_manifest_for(variant, dict(variant.target_kwargs))
        notes.append(f"{classes} classes (the source's classifier): built with num_classes")
    if modules is None:  # opaque names: by structure, identity BNs after folded convs first
        convs = [lay.name for lay in source.layers if lay.class_name == "Conv"]
        source = _with_identity_bn(source, {c: f"{c}:bn" for c in convs} if missing_bn else {})
        modules = _aligned(source, variant, manifest)
    elif missing_bn:  # by names: the target's BN after each conv, from its traced graph
        pairs = _conv_bn_pairs(variant, modules)
        after = {lay: f"{m}:bn" for lay, m in modules.items() if m in pairs}
        source = _with_identity_bn(source, after)
        modules.update({after[lay]: pairs[m] for lay, m in list(modules.items()) if lay in after})
    if missing_bn:
        notes.append(
            f"BatchNorm folded by {raw.graph.exporter}: {len(missing_bn)} BatchNorm modules get"
            " identity statistics (weight 1, mean 0, var 1 - eps) and the folded convs' biases"
        )
    table = onnx_table(raw, source, modules, variant)
    return OnnxPlan(source, table, variant, manifest, notes, bool(found), bool(missing_bn))


def class_count(
    source: SourceModel, modules: dict[str, str], manifest: dict[str, Any]
) -> int | None:
    """The source's class count where its classifier (the layer mapped onto the target's last
    module with a 2-D weight) has another output size than the built target's, else None."""
    matrices = [t for t in manifest["tensors"] if t["key"].endswith(".weight")]
    matrices = [t for t in matrices if len(t["shape"]) == 2]
    if not matrices:
        return None
    module, want = matrices[-1]["key"].rpartition(".")[0], matrices[-1]["shape"][0]
    layer = next((lay for lay in source.layers if modules.get(lay.name) == module), None)
    bias = layer.weights.get("bias") if layer is not None else None
    n = int(bias.shape[0]) if bias is not None and len(bias.shape) == 1 else None
    return n if n is not None and n != want else None


def _aligned(source: SourceModel, variant: Variant, manifest: dict[str, Any]) -> dict[str, str]:
    """Layer -> module by graph structure (the drafting aligner), for opaque names."""
    from .onnx_drafting import align_onnx

    return align_onnx(source, variant, manifest)


def _missing_bn(source: SourceModel, manifest: dict[str, Any]) -> list[str]:
    """Target BN modules when the source has no BatchNormalization at all (folded away)."""
    if any(lay.class_name == "BatchNormalization" for lay in source.layers):
        return []
    return sorted(manifest.get("bn_modules") or {})


def _refuse_folded(raw: RawCheckpoint, folded: Any, missing: list[str], accept: bool) -> None:
    from .onnx_graph import FoldedBN

    if accept:
        return
    folded = folded or FoldedBN(raw.graph.exporter, "no BatchNormalization node", False)
    raise UnsupportedLayerError(
        f"{folded.message(str(raw.path))}; the target has {len(missing)} BatchNorm modules"
        f" ({missing[0]}, ...) with nothing to fill them: pass {FOLDED_FLAG} to convert anyway"
        " with identity BatchNorm statistics"
    )


def _conv_bn_pairs(variant: Variant, modules: dict[str, str]) -> dict[str, str]:
    """Target conv module -> the BatchNorm module its output feeds (from the target's traced
    graph), for the convs the source maps."""
    from .model import build_target

    import torch.fx

    model = build_target(variant.target, **variant.target_kwargs)
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:
        raise MappingError(
            f"cannot trace {variant.target} to find which BatchNorm follows which conv ({exc})"
        ) from None
    pairs = {}
    kinds = dict(model.named_modules())
    for node in graph.nodes:
        if node.op != "call_module" or not _is_bn(kinds.get(node.target)):
            continue
        prev = node.args[0] if node.args else None
        if getattr(prev, "op", None) == "call_module":
            pairs[prev.target] = node.target
    wanted = set(modules.values())
    return {conv: bn for conv, bn in pairs.items() if conv in wanted}


def _is_bn(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


def _with_identity_bn(source: SourceModel, after: dict[str, str]) -> SourceModel:
    """The source plus an identity BatchNorm layer named ``after[conv]`` after each of those
    convs, the conv's (folded) bias as its beta."""
    layers: list[SourceLayer] = []
    for lay in source.layers:
        if lay.name not in after:
            layers.append(lay)
            continue
        weights = {v: t for v, t in lay.weights.items() if v != "bias"}
        keys = {v: k for v, k in lay.keys.items() if v != "bias"}
        conv = SourceLayer(lay.name, lay.class_name, lay.config, "file", weights, keys, lay.index)
        layers += [conv, _identity_bn(lay, after[lay.name])]
    return SourceModel(source.raw, layers, None, "file")


def _identity_bn(conv: SourceLayer, name: str, eps: float = 1e-5) -> SourceLayer:
    """A BatchNorm that computes the identity (weight 1, mean 0, var 1 - eps with its own eps)
    shifted by the folded conv's bias (beta), with PyTorch's default momentum."""
    n = conv.weights["weight"].shape[0 if conv.class_name == "Conv" else 1]
    consts = {
        "gamma": np.ones(n, np.float32),
        "moving_mean": np.zeros(n, np.float32),
        "moving_variance": np.full(n, 1.0 - eps, np.float32),
    }
    weights = {
        v: RawTensor(f"<identity {v}>", (n,), "float32", lambda a=a: a) for v, a in consts.items()
    }
    keys = {v: "" for v in consts}
    if "bias" in conv.weights:
        weights["beta"], keys["beta"] = conv.weights["bias"], conv.keys["bias"]
    config = {"momentum": 0.9, "epsilon": eps, "after": conv.name}
    return SourceLayer(name, "BatchNormalization", config, "folded", weights, keys, conv.index)


def onnx_table(
    raw: RawCheckpoint, source: SourceModel, modules: dict[str, str], variant: Variant
) -> Table:
    """A table for this file: one explicit rule per layer, the ONNX op's transform. An identity
    BN added after a folded conv is not compared itself; its conv is compared at its output (the
    ONNX conv adds the bias the BN now holds)."""
    from .onnx_transforms import OP_TRANSFORMS
    from .transforms import TRANSFORMS

    bn_after = {
        lay.config["after"]: modules[lay.name] for lay in source.layers if "after" in lay.config
    }
    rules = []
    for lay in source.layers:
        if lay.name not in modules:
            continue
        transform = TRANSFORMS.get(OP_TRANSFORMS[lay.class_name])
        tap = lay.config_origin != "folded"
        pattern, module = re.compile(re.escape(lay.name)), modules[lay.name]
        rules.append(Rule(pattern, module, transform, tap=tap, tap_module=bn_after.get(lay.name)))
    size = _input_size(raw)
    return Table(
        "onnx",
        1,
        "onnx",
        f"made for {raw.path.name}: {len(rules)} layers by name",
        [variant],
        rules,
        [],
        Path(f"<onnx {raw.path.name}>"),
        input={"size": size, "range": [-1.0, 1.0]},
    )


def _input_size(raw: RawCheckpoint) -> int:
    """The spatial size of the graph's first input (NCHW, or NHWC from a Keras export), 224 when
    it is symbolic."""
    from .onnx_runner import channels_last

    dims = raw.graph.inputs[0][1] if raw.graph.inputs else []
    size = (dims[2] if channels_last(dims) else dims[-1]) if len(dims) == 4 else None
    return size if isinstance(size, int) and size > 0 else 224


def convert_onnx(
    raw: RawCheckpoint,
    to: str | None,
    *,
    mapping: Any = None,
    num_classes: int | None = None,
    accept_folded_bn: bool = False,
    progress: Any = None,
    sink: Any = None,
) -> Any:
    """Convert an ONNX model read by ``formats.read`` (see :func:`converter.pipeline.convert`)."""
    import json

    from .pipeline import apply_table

    if num_classes is not None:
        raise UnsupportedLayerError(
            f"{raw.path}: --num-classes is not supported for ONNX sources yet; convert, then"
            " replace the head in PyTorch"
        )
    p = plan(raw, to, accept_folded_bn, _user_mapping(raw, mapping, to))
    kwargs = dict(p.variant.target_kwargs)
    result = apply_table(p.source, p.table, p.variant, p.target_manifest, kwargs, progress, sink)
    result.notes = p.notes + result.notes
    result.metadata["source.input"] = json.dumps(p.table.input, sort_keys=True)
    if p.folded:
        result.metadata["source.folded_bn"] = "identity BatchNorm statistics accepted"
    if p.detected:  # an export of a shipped target that kept its parameter names
        result.source_arch = result.metadata["source.arch"] = p.variant.target
    result.metadata["source.exporter"] = raw.graph.exporter
    if p.notes:
        result.metadata["notes"] = json.dumps(p.notes)
    return result


def _user_mapping(raw: RawCheckpoint, mapping: Any, to: str | None) -> dict[str, str] | None:
    """Layer -> module from the user's table (``--mapping``): its rules on the ONNX layer names."""
    if mapping is None:
        return None
    from .tables import load_tables, render

    source = onnx_source(raw)
    (table,) = load_tables(mapping)
    variant = next((v for v in table.variants if to is None or v.target == to), None)
    if variant is None:
        raise MappingError(f"mapping table {mapping} has no variant for {to}")
    out = {}
    for lay in source.layers:
        hit = table.match(lay.name)
        if hit and isinstance(hit[0], Rule):
            out[lay.name] = render(hit[0].target, hit[1], variant, f"rule {hit[0]!r}")
    return out


def inspect_onnx(raw: RawCheckpoint) -> dict[str, Any]:
    """What ``ckptport inspect`` shows of an ONNX file: exporter, opset, layers (with their BN
    attributes and where their names came from), and folded BatchNorm when the graph shows it."""
    from .onnx_graph import folded_bn

    graph = raw.graph
    folded = folded_bn(graph)
    return {
        "exporter": graph.exporter,
        "opset": graph.opset,
        "inputs": [{"name": n, "shape": s} for n, s in graph.inputs],
        "architecture": ", ".join(detect_targets(onnx_source(raw))) or None,
        "config_origin": "file",
        "folded_bn": (
            {"message": folded.message(str(raw.path)), "certain": folded.certain}
            if folded
            else None
        ),
        "layers": [
            {
                "name": lay.name,
                "class": lay.op,
                "node": lay.node_name,
                "name_from": lay.name_origin,
                "vars": {
                    v: {
                        "key": k,
                        "shape": list(raw.tensors[k].shape),
                        "dtype": raw.tensors[k].dtype,
                    }
                    for v, k in lay.weights.items()
                },
                **(
                    {"bn": {k: lay.attrs[k] for k in ("momentum", "epsilon")}}
                    if lay.op == "BatchNormalization"
                    else {}
                ),
            }
            for lay in graph.layers
        ],
    }
