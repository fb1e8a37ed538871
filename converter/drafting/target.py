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


def build_and_trace(
    to: str, shapes: list[tuple[int, ...]], dtype: str = "float32"
) -> tuple[Any, TargetGraph]:
    """The target ``to`` built and traced on the meta device (shapes only: a 2 GiB module
    allocates nothing), or built and traced for real where its code cannot run there
    (:func:`converter.model.build_on_meta`)."""
    from ..model import build_on_meta

    return build_on_meta(to, lambda model: trace_target(model, shapes, dtype))


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
    tracker.sources[id(x)] = frozenset({MODEL_INPUT})
    tracker.keep.append(x)
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


class _Tracker:
    """Tensor id -> the parameterised modules (or the input) it was computed from."""

    def __init__(self) -> None:
        self.sources: dict[int, frozenset[str]] = {}
        self.flat: dict[int, tuple[int, int, int]] = {}
        self.keep: list[Any] = []  # tensors stay alive so their ids are not reused
        self.nodes: dict[str, TargetNode] = {}

    def origin(self, tensors: list[Any]) -> frozenset[str]:
        out: set[str] = set()
        for t in tensors:
            out |= self.sources.get(id(t), frozenset())
        return frozenset(out)

    def pre(self, name: str, module: Any, tensors: dict[str, tuple[int, ...]]):
        def hook(mod, args):
            flat = _tensors(args)
            node = self.nodes.get(name)
            if node is None:
                attrs = module_attrs(module)
                hwc = next((self.flat[id(t)] for t in flat if id(t) in self.flat), None)
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
                self.sources[id(t)] = frozenset({name})
                self.keep.append(t)

        return hook

    def op(self, args: list[Any], result: Any) -> None:
        """A non-module operation: its outputs come from what its inputs came from."""
        ins = _tensors(args)
        origin = self.origin(ins)
        outs = _tensors(result)
        for t in outs:
            if origin:
                self.sources[id(t)] = origin | self.sources.get(id(t), frozenset())
                self.keep.append(t)
            self._flattened(ins, t)

    def _flattened(self, ins: list[Any], out: Any) -> None:
        """Record (H, W, C) on a 2-d tensor made from a 4-d one (flatten/view/reshape), and keep
        it through shape-preserving operations (dropout, activations)."""
        for t in ins:
            if id(t) in self.flat and tuple(t.shape) == tuple(out.shape):
                hwc = self.flat[id(t)]
            elif t.dim() == 4 and out.dim() == 2 and out.shape[1] == t[0].numel():
                _, c, h, w = t.shape
                hwc = (int(h), int(w), int(c))
            else:
                continue
            self.flat[id(out)] = hwc
            self.keep.append(out)  # its id must not be reused while recorded
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
