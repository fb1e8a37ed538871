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
@json_option
def command(path, src_format, show_tensors, as_json) -> int:
    """List layers, tensors, shapes, dtypes and BN config of a source file or of our output."""
    from ..inspection import inspect

    info = inspect(path, src_format)
    if as_json:
        emit_json(info)
        return 0
    from rich.table import Table

    console = stderr_console()
    console.print(f"{info['path']}: [bold]{info['format']}[/], {len(info['tensors'])} tensors")
    if "metadata" in info:
        for k, v in info["metadata"].items():
            console.print(f"  {k}: {v}")
        bn = info.get("bn_config", {})
        if bn:
            t = Table(
                "module",
                "momentum (torch)",
                "Keras momentum",
                "eps",
                "source layer",
                title="BatchNorm",
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
        return 0
    if info.get("layers") is None:
        console.print(f"  layers not resolved: {info.get('resolution_error')}")
        show_tensors = True
    else:
        console.print(
            f"  architecture: {info['architecture'] or 'not a shipped one'}; layer config from:"
            f" {info['config_origin']}"
        )
        if info.get("refused"):
            console.print(f"  recognised: {info['architecture']} (refused: {info['refused']})")
        if info.get("family"):
            console.print(
                f"  family: {info['family']} (table {info['table']}), variant {info['variant']}; "
                f"targets: {', '.join(info['targets'])}"
            )
        if info.get("head"):
            from ..nesting import Head

            console.print(f"  head: {Head(**info['head']).describe()}")
        if info.get("nesting"):
            n = info["nesting"]
            frozen = (
                "; called with training=False (BN frozen while fine-tuning)"
                if n["training"] is False
                else ""
            )
            console.print(
                f"  nested: the base is layer {n['layer']!r} of the user's {n['outer_class']}"
                f" model{frozen}"
            )
    if show_tensors:
        t = Table("key", "shape", "dtype")
        for row in info["tensors"]:
            t.add_row(row["key"], str(tuple(row["shape"])), row["dtype"])
        console.print(t)
        return 0
    t = Table("layer", "class", "variables", "BN config")
    for lay in info["layers"]:
        shapes = ", ".join(f"{v}{tuple(d['shape'])}" for v, d in lay["vars"].items())
        bn = ", ".join(f"{k}={v}" for k, v in lay.get("bn", {}).items())
        t.add_row(lay["name"], lay["class"], shapes, bn)
    console.print(t)
    return 0
