"""ckptport export CONVERTED -o model.onnx"""

from __future__ import annotations

from pathlib import Path

import click

from .common import emit_json, force_option, json_option, stderr_console


@click.command("export")
@click.argument("converted", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="The .onnx file."
)
@click.option(
    "--against",
    type=click.Path(path_type=Path),
    help="A `verify --record` reference: compare with the source's logits too (three-way).",
)
@click.option(
    "--inputs", type=click.Path(path_type=Path), help="A .npy/.npz NHWC batch to compare on."
)
@click.option("--batch", type=int, default=2, show_default=True, help="Random batch size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random batch.")
@click.option(
    "--keep-bn",
    is_flag=True,
    help="Keep BatchNormalization nodes (no folding into the convs), e.g. to fine-tune elsewhere.",
)
@click.option("--opset", type=int, help="ONNX opset (default: torch.onnx's).")
@force_option
@json_option
def command(converted, output, against, inputs, batch, seed, keep_bn, opset, force, as_json):
    """Export a converted checkpoint to ONNX and check it in onnxruntime against PyTorch (and the
    source's recorded logits with --against)."""
    from ..exporting import export_onnx

    report = export_onnx(
        converted,
        output,
        against=against,
        inputs=inputs,
        batch=batch,
        seed=seed,
        keep_bn=keep_bn,
        opset=opset,
        force=force,
    )
    if as_json:
        emit_json(report.to_dict())
        return report.return_code
    console = stderr_console()
    bn = "BatchNorm kept" if report.bn_kept else "BatchNorm folded by torch.onnx's optimiser"
    console.print(f"wrote {report.output}: opset {report.opset}, dynamic batch, {bn}")
    for c in report.comparisons:
        verdict = "ok" if c.passed else "MISMATCH"
        console.print(
            f"  {c.a} vs {c.b}: max abs {c.max_abs:.3g}, rel {c.rel:.3g} (tolerance"
            f" {report.rtol:g}) {verdict}"
        )
    for note in report.notes:
        console.print(f"  note: {note}")
    console.print(f"{'PASS' if report.passed else 'MISMATCH'} on a batch of {report.batch}")
    return report.return_code
