"""ckptport port SRC -o model.py: a readable PyTorch module and its weights from a Keras model"""

from __future__ import annotations

from pathlib import Path

import click

from .common import EXIT_OK, emit_json, force_option, json_option, stderr_console


@click.command("port")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The module to write (.py); the weights go beside it (.safetensors).",
)
@click.option(
    "--allow-stubs",
    is_flag=True,
    help="Write layers with no PyTorch port (Lambda, custom classes) as stubs to fill in by hand.",
)
@click.option("--no-verify", is_flag=True, help="Skip the layer-by-layer comparison with Keras.")
@click.option(
    "--format", "src_format", metavar="NAME", help="Force the source format (see inspect)."
)
@force_option
@json_option
def command(src, output, allow_stubs, no_verify, src_format, force, as_json) -> int:
    """Write a readable PyTorch module (SRC's Keras graph) and its weights, then verify them."""
    from ..porting import port

    result = port(
        src,
        output,
        allow_stubs=allow_stubs,
        verify=not no_verify,
        force=force,
        format=src_format,
    )
    report = result.report
    info = summary(result)
    if as_json:
        emit_json(info)
    else:
        _print(stderr_console(), result, info)
    return report.return_code if report is not None else EXIT_OK


def summary(result) -> dict:
    bn = result.conversion.bn_config
    return {
        "module": str(result.module_path),
        "weights": str(result.weights_path),
        "class": result.class_name,
        "layers": result.layers,
        "weighted_modules": result.modules,
        "tensors": len(result.conversion.state_dict),
        "bn_modules": len(bn),
        "bn_momentum_torch": sorted({c["momentum"] for c in bn.values()}),
        "bn_eps": sorted({c["eps"] for c in bn.values()}),
        "stubs": [
            {"layer": s.layer, "class": s.class_name, "stub": s.stub_class, "reason": s.reason}
            for s in result.stubs
        ],
        "verification": result.report.to_dict() if result.report is not None else None,
        "notes": result.notes,
    }


def _print(console, result, info: dict) -> None:
    console.print(
        f"wrote {result.module_path} (class {result.class_name}, factory()) and"
        f" {result.weights_path}: {info['tensors']} tensors, {info['weighted_modules']} weighted"
        f" modules, {info['layers']} Keras layers"
    )
    if info["bn_modules"]:
        momenta = "/".join(f"{v:g}" for v in info["bn_momentum_torch"])
        eps = "/".join(f"{v:g}" for v in info["bn_eps"])
        console.print(
            f"  BatchNorm: {info['bn_modules']} modules, torch momentum {momenta} (= 1 - Keras),"
            f" eps {eps}"
        )
    for stub in result.stubs:
        console.print(
            f"  stub: {stub.stub_class} for {stub.layer!r} ({stub.class_name}): {stub.reason}"
        )
    for note in result.notes:
        console.print(f"  note: {note}")
    report = result.report
    if report is not None:
        verdict = "PASS" if report.passed else f"MISMATCH (first: {report.first_divergent})"
        worst = max((lay.rel for lay in report.layers), default=0.0)
        console.print(
            f"  verification: {verdict}; {len(report.layers)} layers compared, worst rel error"
            f" {worst:.1e}, output rel error {report.output.get('rel') or 0:.1e}"
        )
        for step in report.train_step or []:
            if not step.passed:
                console.print(f"  train step mismatch: {step.target_module}")
