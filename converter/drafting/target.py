"""The target side of a drafted mapping: the PyTorch module's parameterised modules in execution
order, each with the parameterised modules (or the model input) its input comes from.

One forward pass on a dummy input: forward hooks on every module that holds parameters or buffers
itself, and a ``TorchFunctionMode`` that carries, for every tensor, the set of those modules it
was computed from, through any non-parameterised operation (activations, adds, concatenations,
reshapes, functional calls). A Linear that reads a flattened (N, C, H, W) map records
``flattened_from = (H, W, C)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MappingError

MODEL_INPUT = "<input>"
MODULE_ATTRS = {"kernel_size": "kernel_size", "stride": "strides", "dilation": "dilation"}


@dataclass
class TargetNode:
    """One parameterised module: its path, class, tensors (name -> shape, its own only), its
    hyper-parameters (canonical keys as in graph.py), and the modules its input came from."""

    name: str
    kind: str
    tensors: dict[str, tuple[int, ...]]
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: frozenset[str] = frozenset()
    bases: tuple[str, ...] = ()  # its class's bases by name (timm's Conv2dSame: ..., Conv2d)


@dataclass
class TargetGraph:
    """The parameterised modules in the order they ran, and the modules (or the input) the
    model's output came from."""

    nodes: list[TargetNode]
    outputs: frozenset[str]


def dummy_inputs(shape: tuple[int | None, ...] | None, default: int = 32) -> list[tuple[int, ...]]:
    """Batch-of-1 input shapes to try, from a channels-last source input shape: channels-first
    first ((H, W, C) -> (1, C, H, W), (L, C) -> (1, C, L): convolutions), then as the source has
    it ((1, L, C): recurrent, Embedding and Dense-on-sequence models); unknown sizes become
    ``default``."""
    if not shape:
        return [(1, 3, default, default)]
    dims = [d if d else default for d in shape]
    first = (1, *dims) if len(dims) == 1 else (1, dims[-1], *dims[:-1])
    return [first] if first == (1, *dims) else [first, (1, *dims)]


@dataclass
class TargetSide:
    """What drafting needs of the user's module: its traced graph and its manifest (keys, shapes,
    dtypes, BatchNorm settings: converter.manifest.target_manifest_from_model)."""

    graph: TargetGraph
    manifest: dict[str, Any]


def trace_target_side(to: str, shapes: list[tuple[int, ...]], dtype: str = "float32") -> TargetSide:
    """The module ``to`` built and traced (:func:`traced_here`): in this process when PyTorch is
    loaded here already, otherwise in a child process (converter.drafting.trace_child), so that a
    conversion that drafts never loads PyTorch (~510 MiB resident) into the process that then
    streams the source: a multi-GB checkpoint converts in the memory of its largest layer."""
    import sys

    if "torch" in sys.modules:
        return traced_here(to, shapes, dtype)
    from .trace_child import traced_in_child

    return traced_in_child(to, shapes, dtype)


def traced_here(to: str, shapes: list[tuple[int, ...]], dtype: str = "float32") -> TargetSide:
    """The module built on the meta device (a 2 GiB module allocates nothing and initialises
    nothing) and traced on CPU storage that reads as zeros (:func:`on_empty_cpu`); built and traced
    the ordinary way where its code cannot run so (:func:`converter.model.build_on_meta`)."""
    from ..manifest import target_manifest_from_model
    from ..model import build_on_meta, build_target

    model = build_on_meta(to)[0]
    try:
        graph = trace_target(on_empty_cpu(model), shapes, dtype)
    except MappingError:
        if not _built_on_meta(model):
            raise
        model = build_target(to)  # the real error, if there is one
        graph = trace_target(model, shapes, dtype)
    return TargetSide(graph, target_manifest_from_model(model, to, "user", to, {}))


# glibc's largest mmap threshold on 64-bit (and so torch's CPU allocator's): larger allocations
# are fresh anonymous mappings, which read as zeros from the kernel's zero page and take no
# memory until written.
FRESH_MAPPING_BYTES = 32 * 2**20


def on_empty_cpu(model: Any) -> Any:
    """A meta-built ``model`` given CPU storage for a dummy forward pass, in place: tensors under
    FRESH_MAPPING_BYTES zeroed, larger ones left as allocated (fresh mappings: zeros that are not
    resident). Tracing on the meta device instead runs PyTorch's Python meta kernels, which import
    torch._dynamo (+160 MiB resident); a forward pass on this storage reads a 2 GiB module without
    making it resident. A model with real storage is returned as it is."""
    import itertools

    import torch

    if not _built_on_meta(model):
        return model
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.nelement() * t.element_size() < FRESH_MAPPING_BYTES:
                t.zero_()
    return model


def _built_on_meta(model: Any) -> bool:
    import itertools

    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def graph_to_json(graph: TargetGraph) -> dict[str, Any]:
    """A TargetGraph as JSON types (tuples as lists, sets sorted), for the child process."""
    nodes = [
        {
            "name": n.name,
            "kind": n.kind,
            "tensors": {k: list(v) for k, v in n.tensors.items()},
            "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in n.attrs.items()},
            "inputs": sorted(n.inputs),
            "bases": list(n.bases),
        }
        for n in graph.nodes
    ]
    return {"nodes": nodes, "outputs": sorted(graph.outputs)}


def graph_from_json(data: dict[str, Any]) -> TargetGraph:
    """The inverse of :func:`graph_to_json`."""
    nodes = [
        TargetNode(
            n["name"],
            n["kind"],
            {k: tuple(v) for k, v in n["tensors"].items()},
            {k: tuple(v) if isinstance(v, list) else v for k, v in n["attrs"].items()},
            frozenset(n["inputs"]),
            tuple(n["bases"]),
        )
        for n in data["nodes"]
    ]
    return TargetGraph(nodes, frozenset(data["outputs"]))


def trace_target(model: Any, shapes: list[tuple[int, ...]], dtype: str = "float32") -> TargetGraph:
    """:func:`trace_once` on the first input shape the model accepts (``dtype``: the source's
    input dtype; integer ids for an Embedding)."""
    failures = []
    for shape in shapes:
        try:
            return trace_once(model, shape, dtype)
        except _ForwardFailed as exc:
            failures.append(f"{shape}: {exc}")
    raise MappingError(
        f"running the target on a dummy input failed ({'; '.join(failures)}); does it take the "
        "source's input shape?"
    )


class _ForwardFailed(Exception):
    pass


def trace_once(model: Any, input_shape: tuple[int, ...], dtype: str = "float32") -> TargetGraph:
    """Run ``model`` once on zeros of ``input_shape`` (eval mode, no grad) and return its
    parameterised modules in the order they ran. Modules that never run are left out (their
    tensors stay unfilled and the conversion's accounting names them)."""
    import torch

    tracker = _Tracker()
    handles = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False)) | dict(
            module.named_buffers(recurse=False)
        )
        if own:
            tensors = {k: tuple(v.shape) for k, v in own.items()}
            handles.append(module.register_forward_pre_hook(tracker.pre(name, module, tensors)))
            handles.append(module.register_forward_hook(tracker.post(name)))
    was_training = model.training
    model.eval()
    x = torch.zeros(
        input_shape,
        dtype=torch.long if dtype.startswith(("int", "uint")) else None,
        device=_device(model),
    )
    tracker.sources[x] = frozenset({MODEL_INPUT})
    try:
        with torch.no_grad(), _flow_mode(tracker):
            y = model(x)
    except Exception as exc:
        raise _ForwardFailed(f"{type(exc).__name__}: {exc}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return TargetGraph(list(tracker.nodes.values()), tracker.origin(_tensors(y)))


class TensorRecords:
    """Tensor -> value by identity, keeping no tensor alive (a real forward pass frees each
    activation once used): the entry of a tensor that died, whose id a new tensor may reuse, is
    ignored."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Any, Any]] = {}

    def get(self, t: Any, default: Any = None) -> Any:
        entry = self._entries.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else default

    def __setitem__(self, t: Any, value: Any) -> None:
        import weakref

        self._entries[id(t)] = (weakref.ref(t), value)


class _Tracker:
    """Tensor -> the parameterised modules (or the input) it was computed from."""

    def __init__(self) -> None:
        self.sources = TensorRecords()  # frozenset of module names
        self.flat = TensorRecords()  # (H, W, C) of the 4-d map a 2-d tensor was flattened from
        self.nodes: dict[str, TargetNode] = {}

    def origin(self, tensors: list[Any]) -> frozenset[str]:
        out: set[str] = set()
        for t in tensors:
            out |= self.sources.get(t, frozenset())
        return frozenset(out)

    def pre(self, name: str, module: Any, tensors: dict[str, tuple[int, ...]]):
        def hook(mod, args):
            flat = _tensors(args)
            node = self.nodes.get(name)
            if node is None:
                attrs = module_attrs(module)
                hwc = next((self.flat.get(t) for t in flat if self.flat.get(t)), None)
                if hwc:
                    attrs["flattened_from"] = hwc
                bases = tuple(c.__name__ for c in type(module).__mro__[1:])
                node = TargetNode(name, type(module).__name__, tensors, attrs, bases=bases)
                self.nodes[name] = node
            node.inputs = node.inputs | self.origin(flat)

        return hook

    def post(self, name: str):
        def hook(mod, args, output):
            for t in _tensors(output):
                self.sources[t] = frozenset({name})

        return hook

    def op(self, args: list[Any], result: Any) -> None:
        """A non-module operation: its outputs come from what its inputs came from."""
        ins = _tensors(args)
        origin = self.origin(ins)
        outs = _tensors(result)
        for t in outs:
            if origin:
                self.sources[t] = origin | self.sources.get(t, frozenset())
            self._flattened(ins, t)

    def _flattened(self, ins: list[Any], out: Any) -> None:
        """Record (H, W, C) on a 2-d tensor made from a 4-d one (flatten/view/reshape), and keep
        it through shape-preserving operations (dropout, activations)."""
        for t in ins:
            if self.flat.get(t) and tuple(t.shape) == tuple(out.shape):
                hwc = self.flat.get(t)
            elif t.dim() == 4 and out.dim() == 2 and out.shape[1] == t[0].numel():
                _, c, h, w = t.shape
                hwc = (int(h), int(w), int(c))
            else:
                continue
            self.flat[out] = hwc
            return


def _device(model: Any) -> Any:
    """Where the model's tensors are (the meta device when it was built there), CPU if none."""
    import itertools

    import torch

    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _flow_mode(tracker: _Tracker) -> Any:
    """A TorchFunctionMode that reports every torch function call to ``tracker`` (defined here:
    torch is imported only when a target is traced)."""
    from torch.overrides import TorchFunctionMode

    class FlowMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            tracker.op([args, kwargs], result)
            return result

    return FlowMode()


def _tensors(obj: Any) -> list[Any]:
    """The tensors in a nest of tuples, lists and dicts."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def module_attrs(module: Any) -> dict[str, Any]:
    """A module's hyper-parameters under graph.py's canonical keys (tuples)."""
    out: dict[str, Any] = {}
    for attr, canon in MODULE_ATTRS.items():
        value = getattr(module, attr, None)
        if value is not None and not isinstance(value, str):
            out[canon] = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    groups = getattr(module, "groups", None)
    if isinstance(groups, int):
        out["groups"] = groups
    return out
