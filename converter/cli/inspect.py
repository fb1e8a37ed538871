"""ckptport inspect FILE"""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, json_option, stderr_console


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--format", "src_format", metavar="NAME", help="Force the format.")
@click.option(
    "--tensors", "show_tensors", is_flag=True, help="List every tensor (default: layers)."
)
@click.option(
    "--graph",
    "show_graph",
    is_flag=True,
    help="Every layer: class, kernel/strides/padding/activation and inputs.",
)
@json_option
def command(path, src_format, show_tensors, show_graph, as_json) -> int:
    """List layers, tensors, shapes, dtypes and BN config of a source file or of our output."""
    from ..inspection import inspect

    info = inspect(path, src_format, graph=show_graph)
    if as_json:
        emit_json(info)
        return 0
    console = stderr_console()
    console.print(f"{info['path']}: [bold]{info['format']}[/], {len(info['tensors'])} tensors")
    if "metadata" in info:
        _print_converted(console, info)
        return 0
    if info.get("layers") is None:
        console.print(f"  layers not resolved: {info.get('resolution_error')}")
        show_tensors = True
    else:
        for line in _source_lines(info):
            console.print(f"  {line}")
    for note in info.get("notes", []):
        console.print(f"  note: {note}")
    if show_graph and info.get("graph") is not None:
        console.print(_graph_table(info))
    else:
        console.print(_tensor_table(info) if show_tensors else _layer_table(info))
    return 0


def _table(headers: list[str], rows: list[list[str]]):
    """A table that never truncates: the first two columns (names, classes) keep their full width,
    the others fold onto more lines when the terminal is narrow."""
    from rich.table import Table

    t = Table()
    for i, h in enumerate(headers):
        width = max([len(h), *(len(r[i]) for r in rows)]) if i < 2 else None
        t.add_column(h, no_wrap=i < 2, min_width=width, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return t


def _graph_table(info: dict):
    rows = []
    for lay in info["graph"]:
        name = f"{lay['scope']}/{lay['name']}" if lay["scope"] else lay["name"]
        conf = ", ".join(f"{k}={v}" for k, v in lay["config"].items())
        inputs = ", ".join(lay["inputs"]) if lay["inputs"] is not None else "?"
        rows.append([name, lay["class"], conf, inputs])
    return _table(["layer", "class", "config", "inputs"], rows)


def _print_converted(console, info: dict) -> None:
    """One of our outputs: its metadata and the BN settings it carries."""
    from rich.table import Table

    for k, v in info["metadata"].items():
        console.print(f"  {k}: {v}")
    bn = info.get("bn_config", {})
    if bn:
        t = Table(
            "module", "momentum (torch)", "Keras momentum", "eps", "source layer", title="BatchNorm"
        )
        for mod, c in bn.items():
            t.add_row(
                mod,
                f"{c['momentum']:g}",
                f"{c['keras_momentum']:g}",
                f"{c['eps']:g}",
                c["source_layer"],
            )
        console.print(t)


def _source_lines(info: dict) -> list[str]:
    """Architecture, family, head and nesting of a resolved source."""
    lines = [
        f"architecture: {info['architecture'] or 'not a shipped one'}; layer config from:"
        f" {info['config_origin']}"
    ]
    if "exporter" in info:
        lines.append(f"exported by {info['exporter']}, opset {info['opset']}")
    if info.get("folded_bn"):
        lines.append(info["folded_bn"]["message"])
    if info.get("refused"):
        lines.append(f"recognised: {info['architecture']} (refused: {info['refused']})")
    if info.get("family"):
        lines.append(
            f"family: {info['family']} (table {info['table']}), variant {info['variant']}; "
            f"targets: {', '.join(info['targets'])}"
        )
    if info.get("head"):
        from ..nesting import Head

        lines.append(f"head: {Head(**info['head']).describe()}")
    if info.get("nesting"):
        from ..nesting import Nesting

        lines.append(f"nested: {Nesting(**info['nesting']).describe()}")
    return lines


def _tensor_table(info: dict):
    rows = [[r["key"], str(tuple(r["shape"])), r["dtype"]] for r in info["tensors"]]
    return _table(["key", "shape", "dtype"], rows)


def _layer_table(info: dict):
    rows = []
    for lay in info["layers"]:
        shapes = ", ".join(f"{v}{tuple(d['shape'])}" for v, d in lay["vars"].items())
        bn = ", ".join(f"{k}={v}" for k, v in lay.get("bn", {}).items())
        name = f"{lay['scope']}/{lay['name']}" if lay.get("scope") else lay["name"]
        rows.append([name, lay["class"], shapes, bn])
    return _table(["layer", "class", "variables", "BN config"], rows)
