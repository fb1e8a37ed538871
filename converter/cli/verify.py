"""ckptport verify SRC CONVERTED"""

from __future__ import annotations

from dataclasses import Field, fields
from pathlib import Path
from typing import Any, Callable

import click

from ..verification import VerifyOptions
from .common import emit_json, force_option, json_option, stderr_console

SHARED_OPTIONS = {"force": force_option}  # VerifyOptions fields whose flag is a shared CLI option


def _click_option(f: Field) -> Callable:
    """The click option of one ``VerifyOptions`` field, from the field's own flag and help."""
    meta = f.metadata
    kw: dict[str, Any] = {
        "help": meta["help"],
        "default": f.default,
        "metavar": meta.get("metavar"),
    }
    if "choices" in meta:
        kw.update(type=click.Choice(meta["choices"]), show_default=True)
    elif meta.get("type") == "path":
        kw["type"] = click.Path(path_type=Path)
    elif isinstance(f.default, bool):
        kw["is_flag"] = True
    elif f.default is not None:
        kw.update(type=type(f.default), show_default=True)
    else:
        kw["type"] = meta.get("type", str)
    return click.option(meta["flag"], f.name, **kw)


def verify_options(command: Callable) -> Callable:
    """Every ``VerifyOptions`` field as a click option: one source of truth with ``to_argv``."""
    for f in reversed(fields(VerifyOptions)):
        command = (
            SHARED_OPTIONS[f.name](command)
            if f.name in SHARED_OPTIONS
            else _click_option(f)(command)
        )
    return command


def options_from_params(params: dict[str, Any]) -> VerifyOptions:
    return VerifyOptions(**{f.name: params[f.name] for f in fields(VerifyOptions)})


@click.command("verify")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[SRC] CONVERTED")
@verify_options
@click.option(
    "--html",
    "html_out",
    type=click.Path(path_type=Path),
    help="Write a self-contained HTML report.",
)
@json_option
def command(paths: tuple[Path, ...], html_out: Path | None, as_json: bool, **params: Any) -> int:
    """Run SRC (Keras) and CONVERTED (PyTorch) and compare layer by layer. Exit 0 pass, 1 mismatch,
    2 error. With --against REF, SRC may be left out. --force overwrites --record/--html outputs."""
    from ..errors import ConverterError
    from ..formats import check_output, write_atomic
    from ..verification import verify

    opts = options_from_params(params)
    if len(paths) == 2:
        src, converted = paths
    elif len(paths) == 1 and opts.against is not None:
        src, converted = None, paths[0]
    else:
        raise ConverterError("give SRC and CONVERTED (or CONVERTED with --against REF)")
    inputs = tuple(p for p in (src, converted, opts.against) if p is not None)
    for out in (opts.record, html_out):
        if out is not None:
            check_output(out, opts.force, inputs)  # before the Keras run, not after it
    report = verify(src, converted, opts)
    if html_out is not None:
        from ..report_html import render

        text = render(report, f"{src or opts.against} vs {converted}")
        write_atomic(html_out, lambda tmp: tmp.write_text(text), force=opts.force)
    if as_json:
        emit_json(report.to_dict())
    else:
        show(report)
    return report.return_code


def show(report) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = stderr_console()
    t = Table(
        "#", "Keras layer", "PyTorch module", "max abs", "rel", "cosine", "", title="worst layers"
    )
    for r in report.worst(10):
        t.add_row(
            str(r.index),
            r.source_layer,
            r.target_module,
            f"{r.max_abs:.3g}",
            f"{r.rel:.3g}",
            f"{r.cosine:.8f}",
            "ok" if r.passed else "[red]FAIL[/]",
        )
    console.print(t)
    if report.train_step:
        console.print(_train_step_table(report.train_step))
    o = report.output
    if o.get("comparable", True):
        err = f"max abs {o['max_abs']:.3g}, rel {o['rel']:.3g} (tolerance {report.rtol:g})"
        console.print(f"output ({report.compared}): {err}")
    for e in report.excluded:
        layers = ", ".join(e["source_layers"])
        console.print(f"excluded: {e['module']} (Keras {layers}): {e['reason']}")
    for n in report.notes:
        console.print(f"note: {n}")
    if report.passed:
        console.print(
            f"[green]PASS[/]: {len(report.layers)} layer pairs within rtol {report.rtol:g}"
        )
    else:
        first, *hints = report.mismatch_lines()
        console.print(f"[red]MISMATCH[/]: {escape(first)}")
        for line in hints:
            console.print(escape(line))


def _train_step_table(results):
    from rich.table import Table

    worst = sorted(results, key=lambda b: -max(b.mean_rel, b.var_rel))[:5]
    bt = Table(
        "Keras BN",
        "module",
        "momentum keras/torch",
        "mean err",
        "var err",
        "var err naive",
        title="train step",
    )
    for b in worst:
        bt.add_row(
            b.source_layer,
            b.target_module,
            f"{b.keras_momentum:g}/{b.torch_momentum:g}",
            f"{b.mean_rel:.3g}",
            f"{b.var_rel:.3g}",
            f"{b.var_rel_uncorrected:.3g}",
        )
    return bt
