"""Align a source graph's weighted nodes with a target's parameterised modules, by structure.

1. Candidates: a source node may become a target module when a registered layer transform pairs
   their kinds (``LayerTransform.pairs``), accepts the module (``draft_args``), every source
   variable lands on a target tensor of the same shape after its tensor transform (a bias the
   target lacks may fold into the next BatchNorm), and the hyper-parameters both sides state
   (kernel size, strides, dilation, groups) agree. A source kind no transform pairs (a user's own
   Keras layer) takes the transforms registered for ``CUSTOM_PAIR`` (``same_names``: parameters
   named like its variables); ``draft_args`` sees the module's traced attributes plus ``tensors``
   (its parameter and buffer shapes).
2. Structure: both graphs are contracted to their weighted nodes plus the model input and output
   (an edge where data flows through unweighted operations only). A candidate survives while its
   predecessors and successors can be candidates of the source node's predecessors and
   successors (arc consistency), and a module that is the only candidate of one node is no
   candidate of another. Iterated to a fixpoint, this pins nodes by their data-flow position
   from the input and the output: registration order plays no part.
3. What is left: no candidate -> MappingError naming the layer and why; several ->
   AmbiguousMappingError listing every undecided layer with its candidates.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..errors import AmbiguousMappingError, ConverterError, MappingError
from ..layer_kinds import CUSTOM_PAIR
from ..transforms import TRANSFORMS, LayerTransform, TensorTransform
from .graph import INPUT, SourceGraph, SourceNode
from .target import MODEL_INPUT, TargetGraph, TargetNode

OUTPUT = "<output>"
HYPER = ("kernel_size", "strides", "dilation", "groups")


@dataclass
class Option:
    """How a source node becomes one target module: the transform, its table args, and whether
    the source bias folds into the next BatchNorm (the target conv has no bias)."""

    transform: LayerTransform
    args: dict[str, Any] = field(default_factory=dict)
    folds_bias: bool = False


@dataclass
class Match:
    """One aligned pair, as a drafted rule writes it."""

    source: SourceNode
    target: TargetNode
    transform: LayerTransform
    args: dict[str, Any]
    fold_bias: str | None = None


def transform_index() -> dict[tuple[str, str], list[LayerTransform]]:
    """(source kind, target class) -> the registered transforms that convert it, in registry
    order."""
    index: dict[tuple[str, str], list[LayerTransform]] = defaultdict(list)
    for _, transform in TRANSFORMS.items():
        for pair in transform.pairs:
            index[pair].append(transform)
    return index


def options(s: SourceNode, t: TargetNode, index: dict, hyper: bool = True) -> list[Option]:
    """The ways ``s`` can become ``t`` (see the module docstring, step 1); ``hyper=False``:
    hyper-parameters aside."""
    if hyper and _hyper_differ(s.attrs, t.attrs):
        return []
    out = []
    kind = next((k for k in (t.kind, *t.bases) if (s.kind, k) in index), t.kind)
    found = index.get(CUSTOM_PAIR, []) if is_custom(s.kind, index) else index.get((s.kind, kind))
    for transform in found or []:
        args = transform.draft_args({**t.attrs, "tensors": dict(t.tensors)})
        fold = _shapes_fit(s, t, transform, args) if args is not None else None
        if fold is not None:
            out.append(Option(transform, args, fold))
    return out


def is_custom(kind: str, index: dict) -> bool:
    """A source kind no transform pairs with anything (a user's own Keras layer): the transforms
    registered for :data:`CUSTOM_PAIR` are its candidates (parameters named like its variables)."""
    return not any(k == kind for k, _ in index)


def _hyper_differ(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The hyper-parameters both state differently, as ``key source/target``."""
    return [
        f"{key} {_tup(a[key])}/{_tup(b[key])}"
        for key in HYPER
        if key in a and key in b and _tup(a[key]) != _tup(b[key])
    ]


def _tup(v: Any) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _shapes_fit(
    s: SourceNode, t: TargetNode, transform: LayerTransform, args: dict[str, Any]
) -> bool | None:
    """None when ``transform`` cannot put ``s``'s variables on ``t``; else whether the bias
    folds (the target has no bias)."""
    placed, folds = set(), False
    try:
        params = transform.tensor_params(s.config, dict(s.weights), args)
    except (ConverterError, KeyError, ValueError, IndexError, TypeError):
        return None  # a transform that cannot describe this layer does not fit it
    for var, shape in s.weights.items():
        if var not in params:
            return None
        param, tensor = params[var]
        if param not in t.tensors:
            if var != "bias":
                return None
            folds = True
            continue
        if transformed_shape(tensor, tuple(shape)) != tuple(t.tensors[param]):
            return None
        placed.add(param)
    # target tensors no variable lands on are the transform's to fill (BatchNorm's gamma with
    # scale=False, an RNN's second bias) or are named unfilled by the conversion's accounting
    return folds if placed else None


@lru_cache(maxsize=8192)
def transformed_shape(tensor: TensorTransform, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """``tensor.shape(shape)``, None where the transform refuses the shape (memoised: alignment
    asks for every source-target pair of a kind)."""
    try:
        return tuple(tensor.shape(shape))
    except (ValueError, MappingError):
        return None


# ------------------------------------------------------------------ structure


@dataclass
class _Side:
    """One graph contracted to its weighted nodes: predecessors and successors of each."""

    preds: dict[str, frozenset[str]]
    succs: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        succs: dict[str, set[str]] = defaultdict(set)
        for n, ps in self.preds.items():
            for p in ps:
                succs[p].add(n)
        self.succs = {n: frozenset(succs.get(n, ())) for n in [*self.preds, MODEL_INPUT]}


def source_side(graph: SourceGraph) -> _Side:
    inputs = graph.inputs
    if len(inputs) != 1:
        raise MappingError(
            f"the source has {len(inputs)} inputs; drafting a mapping handles one input"
        )

    def renamed(names: frozenset[str]) -> frozenset[str]:
        return frozenset(MODEL_INPUT if graph.by_name[n].kind == INPUT else n for n in names)

    preds = {n.name: renamed(graph.weighted_inputs(n.name)) for n in graph.weighted}
    out = SourceNode(OUTPUT, OUTPUT, inputs=graph.outputs)
    sink = SourceGraph([*graph.nodes, out])
    preds[OUTPUT] = renamed(sink.weighted_inputs(OUTPUT))
    return _Side(preds)


def target_side(graph: TargetGraph, used: set[str]) -> _Side:
    """The target contracted to the modules some source node may become: the others (a buffer-only
    normalisation at the input, an extra layer) are passed through here, and an unfilled tensor
    of theirs is named by the conversion's accounting instead."""
    inputs = {n.name: n.inputs for n in graph.nodes}

    def through(names: frozenset[str]) -> frozenset[str]:
        out: set[str] = set()
        for n in names:
            out |= through(inputs[n]) if n in inputs and n not in used else {n}
        return frozenset(out)

    preds = {n: through(ins) for n, ins in inputs.items() if n in used}
    preds[OUTPUT] = through(graph.outputs)
    return _Side(preds)


def align(source: SourceGraph, target: TargetGraph) -> list[Match]:
    """Every weighted source node's target module (see the module docstring)."""
    index = transform_index()
    targets = {t.name: t for t in target.nodes}
    opts = {s.name: {t.name: options(s, t, index) for t in target.nodes} for s in source.weighted}
    cands = {s: {t for t, o in per.items() if o} for s, per in opts.items()}
    _unpairable(source, target, cands, index)
    cands[OUTPUT], cands[MODEL_INPUT] = {OUTPUT}, {MODEL_INPUT}
    used = set().union(*cands.values())
    _refine(cands, source_side(source), target_side(target, used))
    _undecided(source, cands)
    return _matches(source, targets, cands, opts)


def _unpairable(source: SourceGraph, target: TargetGraph, cands: dict, index: dict) -> None:
    """A weighted node with no candidate at all (before structure): say why."""
    for s in source.weighted:
        if cands[s.name]:
            continue
        kinds = sorted({t for (k, t) in index if k == s.kind})
        shapes = ", ".join(f"{v} {tuple(sh)}" for v, sh in s.weights.items())
        if is_custom(s.kind, index):
            raise MappingError(
                f"source layer {s.name!r} ({s.kind}: {shapes}) is a layer no transform knows, and "
                "no target module has parameters named like its variables with those sizes: name "
                "the module's parameters like them, or write a --mapping table for it"
            )
        shaped = [t for t in target.nodes if options(s, t, index, hyper=False)]
        if shaped:
            differ = "; ".join(
                f"{t.name}: {', '.join(_hyper_differ(s.attrs, t.attrs))}" for t in shaped[:4]
            )
            raise MappingError(
                f"source layer {s.name!r} ({s.kind}: {shapes}) fits no module of the target: "
                f"those of its shape differ in hyper-parameters (source/target: {differ}); the "
                "target computes something else there (a stride moved to another conv?): fix the "
                "module, or write a --mapping table and a surgery"
            )
        raise MappingError(
            f"source layer {s.name!r} ({s.kind}: {shapes}) fits no module of the target: no "
            f"{'/'.join(kinds)} module has its shapes; is the target built with the same sizes?"
        )


def _refine(cands: dict[str, set[str]], src: _Side, tgt: _Side) -> None:
    """Arc consistency on predecessors and successors, plus uniqueness, to a fixpoint."""
    changed = True
    while changed:
        changed = False
        for s in list(src.preds):
            for t in list(cands[s]):
                if not (
                    _fits(src.preds[s], tgt.preds.get(t, frozenset()), cands)
                    and _fits(src.succs[s], tgt.succs.get(t, frozenset()), cands)
                ):
                    cands[s].discard(t)
                    changed = True
        taken = {next(iter(c)): s for s, c in cands.items() if len(c) == 1}
        for s, c in cands.items():
            for t in [t for t in c if t in taken and taken[t] != s]:
                c.discard(t)
                changed = True


def _fits(ps: frozenset[str], qs: frozenset[str], cands: dict[str, set[str]]) -> bool:
    """Neighbours ``ps`` (source) and ``qs`` (target) can correspond: as many, and each on one
    side has a candidate on the other."""
    if len(ps) != len(qs):
        return False
    return all(cands[p] & qs for p in ps) and all(any(q in cands[p] for p in ps) for q in qs)


def _undecided(source: SourceGraph, cands: dict[str, set[str]]) -> None:
    lost = [s.name for s in source.weighted if not cands[s.name]]
    if lost:
        raise MappingError(
            f"the target's structure does not match the source's around layer(s) "
            f"{', '.join(lost[:6])}: no module with that kind and shape sits at the same place in "
            "the data flow (different branches, order or extra layers?)"
        )
    open_ = [s.name for s in source.weighted if len(cands[s.name]) > 1]
    if open_:
        listed = "; ".join(f"{s} -> {' | '.join(sorted(cands[s]))}" for s in open_)
        first = open_[0]
        raise AmbiguousMappingError(
            f"the structure leaves a choice for {len(open_)} layer(s): {listed}; say which in a "
            f"table of your own and pass it with --mapping (a rule per layer, e.g. source = "
            f'"^{first}$", target = "{sorted(cands[first])[0]}", transform = ...)'
        )


def _matches(
    source: SourceGraph, targets: dict[str, TargetNode], cands: dict, opts: dict
) -> list[Match]:
    chosen = {s.name: next(iter(cands[s.name])) for s in source.weighted}
    out = []
    for s in source.weighted:
        t = chosen[s.name]
        opt = opts[s.name][t][0]
        fold = _fold_target(source, s, chosen, targets) if opt.folds_bias else None
        out.append(Match(s, targets[t], opt.transform, opt.args, fold))
    return out


def _fold_target(
    source: SourceGraph, s: SourceNode, chosen: dict[str, str], targets: dict[str, TargetNode]
) -> str:
    """The module whose running mean absorbs ``s``'s bias: the one weighted successor of ``s``,
    when it keeps running statistics."""
    after = [n for n in source.weighted if s.name in source.weighted_inputs(n.name)]
    if len(after) == 1 and "running_mean" in targets[chosen[after[0].name]].tensors:
        return chosen[after[0].name]
    raise MappingError(
        f"source layer {s.name!r} has a bias that target module {chosen[s.name]!r} lacks, and no "
        "BatchNorm right after it to fold it into; give the module a bias"
    )
