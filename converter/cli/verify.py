"""ckptport verify SRC CONVERTED"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import OutputExistsError
from .common import emit_json, json_option, stderr_console


@click.command("verify")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="[SRC] CONVERTED")
@click.option("--inputs", type=click.Path(path_type=Path), help="A .npy/.npz NHWC batch or a folder of images (default: seeded random batch in the table's input domain).")
@click.option("--batch", default=4, show_default=True, help="Random batch size when --inputs is not given.")
@click.option("--seed", default=0, show_default=True)
@click.option("--rtol", type=float, help="Max |error| / RMS(reference) per layer (float32 default 1e-4).")
@click.option("--atol", type=float, default=0.0, show_default=True)
@click.option("--train-step", is_flag=True, help="Also compare BN running stats after one training-mode step.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--record", type=click.Path(path_type=Path), help="Save the Keras per-layer outputs and inputs as a reference file.")
@click.option("--against", type=click.Path(path_type=Path), help="Verify against a recorded reference (no TensorFlow needed; SRC may be left out).")
@click.option("--mapping", type=click.Path(path_type=Path), help="The user table used for the conversion.")
@click.option("--source-model", metavar="MODULE:FUNCTION")
@click.option("--html", "html_out", type=click.Path(path_type=Path), help="Write a self-contained HTML report.")
@click.option("--force", is_flag=True, help="Overwrite --record/--html outputs.")
@json_option
def command(paths, inputs, batch, seed, rtol, atol, train_step, device, record, against, mapping,
            source_model, html_out, force, as_json) -> int:
    """Run SRC (Keras) and CONVERTED (PyTorch) and compare layer by layer. Exit 0 pass, 1 mismatch, 2 error.
    With --against REF, SRC may be left out."""
    from ..errors import ConverterError
    from ..verification import verify

    if len(paths) == 2:
        src, converted = paths
    elif len(paths) == 1 and against is not None:
        src, converted = None, paths[0]
    else:
        raise ConverterError("give SRC and CONVERTED (or CONVERTED with --against REF)")
    for p in (record, html_out):
        if p is not None and p.exists() and not force:
            raise OutputExistsError(f"{p} exists; pass --force to overwrite it")
    report = verify(src, converted, inputs=inputs, batch=batch, seed=seed, rtol=rtol, atol=atol,
                    train_step=train_step, device=device, record=record, against=against, mapping=mapping,
                    source_model=source_model, force=force)
    if html_out is not None:
        from ..report_html import render

        from ..formats import write_atomic

        text = render(report, f"{src or against} vs {converted}")
        write_atomic(html_out, lambda tmp: tmp.write_text(text), force=force)
    rc = 0 if report.passed else 1
    if as_json:
        emit_json(report.to_dict())
        return rc
    show(report)
    return rc


def show(report) -> None:
    from rich.table import Table

    console = stderr_console()
    t = Table("#", "Keras layer", "PyTorch module", "max abs", "rel", "cosine", "", title="worst layers")
    for r in report.worst(10):
        t.add_row(str(r.index), r.source_layer, r.target_module, f"{r.max_abs:.3g}", f"{r.rel:.3g}",
                  f"{r.cosine:.8f}", "ok" if r.passed else "[red]FAIL[/]")
    console.print(t)
    if report.train_step:
        worst = sorted(report.train_step, key=lambda b: -max(b.mean_rel, b.var_rel))[:5]
        bt = Table("Keras BN", "module", "momentum keras/torch", "mean err", "var err", "var err naive", title="train step")
        for b in worst:
            bt.add_row(b.source_layer, b.target_module, f"{b.keras_momentum:g}/{b.torch_momentum:g}",
                       f"{b.mean_rel:.3g}", f"{b.var_rel:.3g}", f"{b.var_rel_uncorrected:.3g}")
        console.print(bt)
    o = report.output
    console.print(f"output ({report.compared}): max abs {o['max_abs']:.3g}, rel {o['rel']:.3g} (tolerance {report.rtol:g})")
    for n in report.notes:
        console.print(f"note: {n}")
    if report.passed:
        console.print(f"[green]PASS[/]: {len(report.layers)} layer pairs within tolerance")
    else:
        f = report.first_divergent
        console.print(f"[red]MISMATCH[/]: first divergent layer {f['source_layer']} -> {f['target_module']} (rel {f['rel']:.3g})")
