"""Drafted mappings: a mapping table written from the structure of the source and the target.

For a source no table fits and a target that is the user's own module (``--to file.py:factory``):
the source's layer graph (graph.py, from its stored Keras config) is aligned with the modules the
target runs on a dummy input (target.py) by kind, shapes, hyper-parameters and data-flow position
(align.py), and the result is an ordinary table (TOML, one explicit rule per layer, both shapes in
a comment) that the pipeline then applies like any other and the user can review, edit and pass
back with ``--mapping``.

    draft = converter.drafting.draft("model.h5", "model.py:build")
    draft.write("model.mapping.toml")
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import MappingError
from .align import Match, align
from .graph import INPUT, SourceGraph, SourceNode, graph_from_keras_config

if TYPE_CHECKING:
    from ..source import SourceModel
    from ..tables import Table

__all__ = ["Draft", "draft", "draft_for_source", "source_graph"]

DRAFTED_ID = "drafted"


@dataclass
class Draft:
    """A drafted table: its TOML ``text`` and the matches it was written from."""

    text: str
    matches: list[Match]
    target: str
    source_path: Path
    notes: list[str] = field(default_factory=list)  # BatchNorm eps the target is built without

    def table(self) -> Table:
        from ..tables import loads_table

        return loads_table(self.text, f"<table drafted for {self.source_path.name}>")

    def write(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Write the table atomically; refuses to overwrite without ``force`` or to write over the
        source."""
        from ..formats import write_atomic

        return write_atomic(
            path, lambda tmp: tmp.write_text(self.text), force=force, inputs=(self.source_path,)
        )

    def rows(self) -> list[dict[str, Any]]:
        """One dict per rule (for --json)."""
        return [
            {
                "source_layer": m.source.name,
                "source_class": m.source.kind,
                "target_module": m.target.name,
                "target_class": m.target.kind,
                "transform": m.transform.name,
                **({"args": m.args} if m.args else {}),
                **({"fold_bias": m.fold_bias} if m.fold_bias else {}),
            }
            for m in self.matches
        ]


def draft(
    src: str | os.PathLike,
    to: str,
    *,
    source_model: str | None = None,
    format: str | None = None,
) -> Draft:
    """Draft the table mapping ``src`` (a Keras/TF file with a model config, or any file with
    ``source_model``) onto the PyTorch model spec ``to``."""
    from ..source import resolve_source

    return draft_for_source(resolve_source(src, source_model=source_model, format=format), to)


def draft_for_source(source: SourceModel, to: str) -> Draft:
    """Draft the table for an already resolved source (what ``convert`` does when no table fits)."""
    from .target import dummy_inputs, trace_target_side

    graph, moved = without_preprocessing(source_graph(source))
    side = trace_target_side(to, dummy_inputs(graph.input_shape()), graph.input_dtype())
    try:
        matches = align(graph, side.graph)
    except MappingError as exc:
        if not chained(source_config(source)):
            raise
        raise type(exc)(f"{exc} ({CHAINED})") from exc
    text = render_table(matches, to, source, graph, moved) + target_record(to, side.manifest)
    return Draft(text, matches, to, source.raw.path, _eps_notes(matches, side.manifest))


def target_record(to: str, manifest: dict[str, Any]) -> str:
    """The ``[target_manifest]`` section of a drafted table (see tables._target_record): for a
    module file, what converting with the table needs of the module, so that it imports no
    PyTorch while the file is unchanged; nothing for an importable module."""
    from ..formats import sha256_path
    from ..specs import parse_spec

    spec = parse_spec(to)
    if spec.kind != "file":
        return ""
    recorded = json.dumps(manifest, sort_keys=True)
    return "\n".join(
        [
            "",
            "# The module as drafted (keys, shapes, dtypes, BatchNorm settings): convert reuses",
            "# it, importing no PyTorch, while the module's file has this sha256; delete it to",
            "# rebuild from the module.",
            "[target_manifest]",
            f"target = {_q(to)}",
            f'sha256 = "{sha256_path(spec.path)}"',
            f"json = '''{recorded}'''",
            "",
        ]
    )


def _eps_notes(matches: list[Match], manifest: dict[str, Any]) -> list[str]:
    """The target's BatchNorm modules constructed with another eps than their source layer's."""
    from ..pipeline import eps_mismatch_notes

    bn = manifest["bn_modules"]
    pairs = {
        m.target.name: (bn[m.target.name]["eps"], m.source.config["epsilon"])
        for m in matches
        if m.source.kind == "BatchNormalization"
        and "epsilon" in m.source.config
        and m.target.name in bn
    }
    return eps_mismatch_notes(pairs)


def without_preprocessing(graph: SourceGraph) -> tuple[SourceGraph, list[SourceNode]]:
    """The graph with the preprocessing layers that read the model input directly (Keras
    Rescaling, Normalization: converter/preprocessing.py) made transparent, and those layers:
    the drafted table drops them as preprocessing, recorded in the output, as shipped tables do."""
    from ..preprocessing import PREPROCESSING

    known = {name for name, _ in PREPROCESSING.items()}
    moved: list[SourceNode] = []
    nodes = []
    for node in graph.nodes:
        at_input = all(
            graph.by_name[i].kind == INPUT or i in {m.name for m in moved} for i in node.inputs
        )
        if node.kind in known and node.inputs and at_input:
            moved.append(node)
            node = replace(node, weights={})
        nodes.append(node)
    return SourceGraph(nodes, graph.outputs), moved


CHAINED = (
    "the source stores no connections between its layers (a TF1 checkpoint, a model config "
    "without inbound_nodes), so they were drafted as a chain in creation order; "
    "a model with branches needs a --mapping table"
)


def source_config(source: SourceModel) -> dict[str, Any] | None:
    """The Keras model config drafting reads: the file's (or --source-model's), else the layer
    list a TF1 checkpoint's variable names give (converter/formats/tf1.py), else None."""
    if source.model_config is None and source.config_origin == "variable names":
        return source.raw.fallback_config
    return source.model_config


def chained(config: dict[str, Any] | None) -> bool:
    """A functional model's config without connections (no ``input_layers``): its weighted layers
    are read as a chain in creation order, which only shapes, kinds and verification check."""
    cfg = (config or {}).get("config", {})
    return (
        config is not None
        and config.get("class_name") != "Sequential"
        and ("input_layers" not in cfg)
    )


def source_graph(source: SourceModel) -> SourceGraph:
    """The layer graph of a resolved source: its Keras config with the checkpoint's shapes."""
    config = source_config(source)
    if config is None:
        raise MappingError(
            f"{source.raw.path} ({source.raw.format}) stores no model config, so there is no layer "
            "graph to draft a mapping from; convert the .keras/.h5 file that has one, or pass "
            "--source-model module:function that builds the Keras model"
        )
    weights = {
        lay.name: {v: tuple(t.shape) for v, t in lay.weights.items()} for lay in source.layers
    }
    return graph_from_keras_config(config, weights)


# ------------------------------------------------------------------ the TOML text


def render_table(
    matches: list[Match],
    to: str,
    source: SourceModel,
    graph: SourceGraph,
    moved: list[SourceNode] = (),
) -> str:
    """An ordinary mapping table: one anchored rule per source layer, in the source's order."""
    shape = graph.input_shape() or ()
    size = shape[0] if len(shape) == 3 and shape[0] else 32
    lines = [
        f"# Drafted by ckptport {__version__} from the structure of {source.raw.path.name}",
        f"# and {to}: review it, edit it if needed, and pass it back with --mapping.",
        "# Each rule: source layer (anchored regex) -> target module, transform; shapes in the",
        "# comment above it. [input] range: the values the source expects (edit to yours).",
        *(_comment("Note: " + CHAINED + ".") if chained(source_config(source)) else []),
        "[table]",
        f'id = "{DRAFTED_ID}"',
        "version = 1",
        f"description = {_q('drafted from ' + source.raw.path.name + ' for ' + to)}",
        "",
        "[input]",
        f"size = {int(size)}",
        "range = [0.0, 1.0]",
        "",
        "[[variants]]",
        f"target = {_q(to)}",
    ]
    for m in matches:
        lines += ["", *_rule_lines(m)]
    for node in moved:
        lines += [
            "",
            "[[drops]]",
            f"source = {_q('^' + re.escape(node.name) + '$')}",
            'as = "preprocessing"',
            f"reason = {_q(node.kind + ' on the input: recorded in the output, not a weight')}",
        ]
    return "\n".join(lines) + "\n"


def _rule_lines(m: Match) -> list[str]:
    src = ", ".join(f"{v} {_shape(s)}" for v, s in m.source.weights.items())
    tgt = ", ".join(f"{k} {_shape(s)}" for k, s in m.target.tensors.items())
    lines = [
        "[[rules]]",
        f"# {m.source.name} ({m.source.kind}): {src}",
        f"#   -> {m.target.name or '<model>'} ({m.target.kind}): {tgt}",
        f"source = {_q('^' + re.escape(m.source.name) + '$')}",
        f"target = {_q(m.target.name)}",
        f"transform = {_q(m.transform.name)}",
    ]
    if m.fold_bias:  # the module's own output lacks the bias: compared after the BatchNorm
        lines += [f"fold_bias = {_q(m.fold_bias)}"]
    if m.fold_bias or "activation" in m.source.attrs:
        lines.append("tap = false  # " + _untapped(m))
    if m.args:
        inner = ", ".join(f"{k} = {json.dumps(v)}" for k, v in m.args.items())
        lines.append(f"args = {{ {inner} }}")
    return lines


def _untapped(m: Match) -> str:
    """Why verification does not compare this module's output with the layer's."""
    if m.fold_bias:
        return f"its bias is folded into {m.fold_bias}: compared there"
    return f"the Keras layer applies {m.source.attrs['activation']} inside; the module does not"


def _comment(text: str) -> list[str]:
    """``text`` as TOML comment lines of at most 100 characters."""
    import textwrap

    return ["# " + line for line in textwrap.wrap(text, 98)]


def _q(text: str) -> str:
    """A TOML basic string (JSON escapes are TOML escapes)."""
    return json.dumps(text)


def _shape(shape: Any) -> str:
    return str(tuple(int(d) for d in shape))
