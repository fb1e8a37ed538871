"""Write the PyTorch module of a Keras graph: ``__init__`` from the emitters' constructors,
``forward`` following the graph, channels-first in and out, plus the helpers and classes used."""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedLayerError
from ..registry import RegistryError
from .emitters import ANY, CF, CL, EMITTERS, Piece, Site, comparable
from ..keras_graph import Call, Graph, Ref
from .layer_emitters import Unsupported
from .snippets import CLASSES, HELPERS

# nn.Module attributes a layer name must not shadow (checked again against torch when writing)
# Keras ops (``x + 3.0`` in a functional model) ported: arithmetic; other ops become stubs
OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")
SHORT_NAMES = ("x", "y", "z", "u", "v", "w")
NAMES_IN_FILE = {"torch", "F", "nn", "self", "factory", "pad_same", "avg_pool_same"}
RESERVED = {"forward", "training", "eval", "train", "to", "type", "float", "half", "double"}


@dataclass
class RuleSpec:
    """One row of the port's mapping table: Keras layer -> module attribute, weight transform."""

    layer: str
    attr: str
    transform: str
    args: dict[str, Any]
    tap: bool


@dataclass
class Stub:
    layer: str
    class_name: str  # the Keras class
    stub_class: str  # the class written into the file
    reason: str
    weights: list[str]


@dataclass
class Tensor:
    var: str
    rank: int
    layout: str


@dataclass
class ModuleSource:
    """The generated module and what the conversion needs from it."""

    code: str
    class_name: str
    rules: list[RuleSpec]
    stubs: list[Stub]
    inputs: list[tuple[str, list[int | None]]]  # forward argument, Keras shape (no batch)
    outputs: list[int]  # rank of each output


def identifier(name: str, taken: set[str]) -> str:
    """A Keras layer name as a Python identifier, unique among ``taken`` (which it joins)."""
    ident = re.sub(r"\W", "_", name)
    if not ident or ident[0].isdigit():
        ident = f"layer_{ident}"
    if keyword.iskeyword(ident) or ident in RESERVED or _module_attr(ident):
        ident += "_"
    base, n = ident, 1
    while ident in taken:
        n += 1
        ident = f"{base}_{n}"
    taken.add(ident)
    return ident


def _module_attr(name: str) -> bool:
    import torch

    return hasattr(torch.nn.Module, name)


def class_identifier(name: str) -> str:
    parts = re.split(r"\W|_", name)
    ident = "".join(p[:1].upper() + p[1:] for p in parts if p) or "Model"
    return ident if not ident[0].isdigit() else f"Model{ident}"


def relayout(expr: str, rank: int, src: str, dst: str) -> str:
    """``expr`` permuted from layout ``src`` to ``dst`` (nothing for rank <= 2 or equal)."""
    if rank <= 2 or src == dst or ANY in (src, dst):
        return expr
    rest = list(range(2, rank)) if src == CF else list(range(1, rank - 1))
    dims = [0] + rest + [1] if src == CF else [0, rank - 1] + rest
    return f"{expr}.permute({', '.join(map(str, dims))})"


@dataclass
class _Writer:
    graph: Graph
    weights: dict[str, dict[str, tuple[int, ...]]]
    class_name: str
    taken: set[str] = field(default_factory=lambda: set(NAMES_IN_FILE) | set(SHORT_NAMES))
    attrs: dict[str, str] = field(default_factory=dict)
    tensors: dict[Ref, Tensor] = field(default_factory=dict)
    init: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    rules: list[RuleSpec] = field(default_factory=list)
    stubs: list[Stub] = field(default_factory=list)
    helpers: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    uses: dict[Ref, int] = field(default_factory=dict)
    variables: set[str] = field(default_factory=set)
    built: set[str] = field(default_factory=set)  # attributes whose constructor is written
    named: set[str] = field(default_factory=set)  # variables named after a layer or an input

    def write(self) -> ModuleSource:
        args = self._inputs()
        for ref in [r for c in self.graph.calls for r in c.tensors] + self.graph.outputs:
            self.uses[ref] = self.uses.get(ref, 0) + 1
        for c in self.graph.calls:
            self._call(c)
        outs = [self._output(r) for r in self.graph.outputs]
        self.forward.append(f"return {', '.join(outs)}")
        return ModuleSource(
            self._source(args),
            self.class_name,
            self.rules,
            self.stubs,
            [(a, shape) for a, (_, shape, _) in zip(args, self.graph.inputs)],
            [self.tensors[r].rank for r in self.graph.outputs],
        )

    def _inputs(self) -> list[str]:
        names = []
        for ref, shape, _ in self.graph.inputs:
            var = "x" if len(self.graph.inputs) == 1 else identifier(ref.layer, self.taken)
            self.taken.add(var)
            self.variables.add(var)
            if var != "x":
                self.named.add(var)
            rank = len(shape) + 1
            self.tensors[ref] = Tensor(var, rank, CF if rank > 2 else CL)
            names.append(var)
        return names

    def _output(self, ref: Ref) -> str:
        t = self.tensors[ref]
        return relayout(t.var, t.rank, t.layout, CF)

    def _call(self, c: Call) -> None:
        site, piece = self._piece(c)
        wants = self._wants(c, site)
        args = [self._arg(a, wants) for a in c.inputs]
        first = args[0] if args else ""
        tensor_args = [a for a, raw in zip(args, c.inputs) if isinstance(raw, Ref)]
        m = f"self.{site.attr}"
        expr = piece.expr.format(*args, x=first, xs=", ".join(tensor_args), m=m)
        var = self._out_var(c, site.attr)
        self.forward.append(f"{var} = {expr}")
        self.tensors[c.output] = Tensor(var, piece.rank, piece.layout)
        self._declare(c, site, piece)

    def _wants(self, c: Call, site: Site) -> str:
        if site.layouts and self._emitter_wants(c) == ANY:
            return site.layouts[0]
        return self._emitter_wants(c)

    def _emitter_wants(self, c: Call) -> str:
        if c.class_name in EMITTERS and not self._is_stub(c):
            return EMITTERS.get(c.class_name).wants
        return CL  # a stub sees Keras' own layout

    def _is_stub(self, c: Call) -> bool:
        return any(s.layer == c.layer for s in self.stubs)

    def _arg(self, raw: Any, wants: str) -> str:
        if not isinstance(raw, Ref):
            return repr(raw)
        t = self.tensors[raw]
        return relayout(t.var, t.rank, t.layout, wants)

    def _out_var(self, c: Call, attr: str) -> str:
        """The output's variable, as a person would name it: a tensor used more than once (a
        branch point, an output) is named after its layer; a chain reuses its input's name when
        that input is dead (``x = self.conv(x)``), else takes a free short name."""
        for ref in c.tensors:
            self.uses[ref] -= 1
        several_outputs = len(self.graph.outputs) > 1 and c.output in self.graph.outputs
        if self.uses.get(c.output, 0) > 1 or several_outputs:
            return self._fresh(attr)
        first = c.tensors[0] if c.tensors else None
        if first is not None and self.uses[first] == 0 and first not in self.graph.outputs:
            return self.tensors[first].var
        live = {t.var for ref, t in self.tensors.items() if self.uses.get(ref, 0) > 0}
        free = [v for v in SHORT_NAMES if v not in live and v not in self.named]
        return free[0] if free else self._fresh(attr)

    def _fresh(self, attr: str) -> str:
        var, n = attr, 1
        while var in self.variables:
            n += 1
            var = f"{attr}_{n}"
        self.variables.add(var)
        self.named.add(var)
        return var

    def _piece(self, c: Call) -> tuple[Site, Piece]:
        if c.layer not in self.attrs:
            self.attrs[c.layer] = identifier(c.layer, self.taken)
        tensors = [self.tensors[r] for r in c.tensors]
        site = Site(
            c,
            self.attrs[c.layer],
            [t.rank for t in tensors],
            [t.layout for t in tensors],
            self.weights.get(c.layer, {}),
        )
        try:
            if c.is_op and c.class_name not in OPS:
                raise Unsupported(f"the Keras op {c.class_name} is not ported")
            return site, EMITTERS.get(c.class_name).emit(site)
        except (RegistryError, Unsupported, KeyError, ValueError, TypeError) as exc:
            return site, self._stub(c, site, exc)

    def _stub(self, c: Call, site: Site, exc: Exception) -> Piece:
        reason = "no PyTorch equivalent" if isinstance(exc, RegistryError) else str(exc)
        if c.class_name in ("Lambda", "TFOpLambda", "SlicingOpLambda"):
            reason = "runs Python code stored in the model, which ckptport never executes"
        stub_class = class_identifier(site.attr) + "Stub"
        weights = sorted(site.weights)
        self.stubs.append(Stub(c.layer, c.class_name, stub_class, reason, weights))
        self.classes.append(stub_source(stub_class, c, reason))
        args = ", ".join(f"{{{i}}}" for i, r in enumerate(c.inputs) if isinstance(r, Ref))
        rank = site.ranks[0] if site.ranks else 2
        return Piece(f"{stub_class}()", "{m}(" + args + ")", rank, CL, tap=False)

    def _declare(self, c: Call, site: Site, piece: Piece) -> None:
        """The constructor line (once per layer), the table rule, the helpers and classes."""
        for name in piece.helpers:
            if name not in self.helpers:
                self.helpers.append(name)
        for name in piece.classes:
            if CLASSES[name] not in self.classes:
                self.classes.append(CLASSES[name])
        if piece.init is None or site.attr in self.built:
            return
        self.built.add(site.attr)
        self.init.append(f"self.{site.attr} = {piece.init}")
        self.init += [a.format(m=f"self.{site.attr}") for a in piece.after]
        if piece.transform and site.weights:
            tap = piece.tap and comparable(piece.rank, piece.layout)
            tap = tap and c.layer not in self.graph.shared
            self.rules.append(RuleSpec(c.layer, site.attr, piece.transform, piece.args, tap))

    def _source(self, args: list[str]) -> str:
        parts = ["import torch", "import torch.nn.functional as F", "from torch import nn", ""]
        parts += [HELPERS[h] for h in HELPERS if h in self.helpers]
        parts += self.classes
        init = "\n        ".join(self.init) or "pass"
        body = "\n        ".join(self.forward)
        parts.append(
            f"\nclass {self.class_name}(nn.Module):\n"
            f"    def __init__(self):\n        super().__init__()\n        {init}\n\n"
            f"    def forward(self, {', '.join(args)}):\n        {body}\n"
        )
        parts.append(
            f'\ndef factory():\n    """Build the model (weights not loaded)."""\n'
            f"    return {self.class_name}()\n"
        )
        return "\n".join(parts)


def stub_source(stub_class: str, c: Call, reason: str) -> str:
    config = readable_config(c.config)
    return (
        f"\nclass {stub_class}(nn.Module):\n"
        f'    """Keras layer {c.layer!r} ({c.class_name}) was not ported: {reason}.\n'
        f'    Write its forward by hand (inputs and output in Keras\' channels-last order)."""\n\n'
        f"    config = {config!r}\n\n"
        f"    def forward(self, *inputs):\n"
        f"        raise NotImplementedError(\n"
        f'            f"Keras layer {c.layer!r} ({c.class_name}) has no PyTorch port; config:'
        f' {{self.config}}"\n        )\n'
    )


def readable_config(config: Any) -> Any:
    """A layer config for a stub's docstring: no dtype policy, long strings (marshalled code)
    cut."""
    if isinstance(config, dict):
        return {k: readable_config(v) for k, v in config.items() if k not in ("dtype",)}
    if isinstance(config, list):
        return [readable_config(v) for v in config]
    if isinstance(config, str) and len(config) > 80:
        return f"<{len(config)} characters not shown>"
    return config


def write_module(
    graph: Graph, weights: dict[str, dict[str, tuple[int, ...]]], class_name: str
) -> ModuleSource:
    """The generated module's source (not yet black-formatted) and its mapping rules."""
    if not graph.calls:
        raise UnsupportedLayerError("the model has no layers to port")
    return _Writer(graph, weights, class_name).write()
