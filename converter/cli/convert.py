"""ckptport convert SRC [--to SPEC] [-o OUT]; several SRC (or a directory of them): -o DIR"""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConverterError, UnsupportedLayerError, VerificationError
from .common import EXIT_OK, emit_json, force_option, json_option, stderr_console


def summary(result, out: Path | None) -> dict:
    momenta = sorted({c["momentum"] for c in result.bn_config.values()})
    eps = sorted({c["eps"] for c in result.bn_config.values()})
    return {
        "output": str(out) if out else None,
        "source_arch": result.source_arch,
        "config_origin": result.config_origin,
        "target": result.target,
        "table": result.table_id,
        "tensors": len(result.state_dict),
        "bn_modules": len(result.bn_config),
        "bn_momentum_torch": momenta,
        "bn_eps": eps,
        "surgeries": [s["name"] for s in result.surgeries],
        "preprocessing": result.preprocessing,
        "dropped": result.dropped,
        "head_reset": result.head_reset,
        "source_head": result.source_head,
        "nesting": result.nesting,
        "notes": result.notes,
    }


@click.command("convert")
@click.argument("srcs", metavar="SRC...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    metavar="SPEC",
    help=(
        "Target, e.g. timm:tf_efficientnet_b0 (default: the table's for the detected architecture)."
    ),
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help=(
        "Output file (.safetensors, or .pt). Default: ./<src>.safetensors. Several sources: an"
        " existing directory (default: .), each written as DIR/<name>.safetensors."
    ),
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Several sources: worker processes (0: one per CPU). Each holds one checkpoint at once.",
)
@click.option(
    "--format",
    "src_format",
    metavar="NAME",
    help="Force the source format (see `ckptport inspect`).",
)
@click.option(
    "--mapping",
    type=click.Path(path_type=Path),
    help="Your own mapping table (TOML) instead of the built-in ones.",
)
@click.option(
    "--source-model",
    metavar="MODULE:FUNCTION",
    help="Your code that builds the Keras model, for files without config.",
)
@click.option(
    "--num-classes",
    type=int,
    help="Drop the source classifier; fresh head of this size, initialised the architecture's way.",
)
@click.option(
    "--pooling",
    type=click.Choice(["avg", "max", "none"]),
    help=(
        "Pooling after a headless/nested base, for files that do not record it (TF checkpoint, "
        "SavedModel)."
    ),
)
@click.option(
    "--use-ema",
    is_flag=True,
    help="TF1 checkpoints: take the ExponentialMovingAverage shadow values, not the raw ones.",
)
@click.option(
    "--source-bn-momentum",
    type=float,
    metavar="M",
    help="The source's BN momentum (Keras convention) where the file does not record it (TF1).",
)
@click.option(
    "--verify",
    "do_verify",
    is_flag=True,
    help="Run the layer-by-layer verification after converting.",
)
@click.option(
    "--accept-folded-bn",
    is_flag=True,
    help=(
        "ONNX sources whose BatchNorm the exporter folded into the convs: convert anyway, the"
        " target's BatchNorm modules getting identity statistics."
    ),
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the verification that follows a drafted mapping (see `ckptport draft`).",
)
@click.option(
    "--inputs",
    "verify_inputs",
    type=click.Path(path_type=Path),
    help="With --verify: a .npy/.npz NHWC batch or a folder of images to verify on.",
)
@click.option(
    "--output-io",
    type=click.Choice(["auto", "direct", "buffered"]),
    default="auto",
    show_default=True,
    help=(
        "How a .safetensors output is written: direct (O_DIRECT, around the page cache),"
        " buffered, or auto:"
        " direct when the command writes more than the kernel lets pile up dirty"
        " (vm.dirty_background_*; a batch counts all its sources)."
    ),
)
@click.option(
    "--skip-existing",
    is_flag=True,
    help=(
        "Leave an output that exists as it is and say so (a rerun over a training run's"
        " directory converts only its new checkpoints)."
    ),
)
@force_option
@json_option
def command(srcs, jobs, **params) -> int:
    """Convert a Keras/TF checkpoint or an ONNX model SRC to a PyTorch state dict. With no table
    for SRC and --to your own module (file.py:factory), a mapping is drafted from both
    structures, written beside the output as OUT.mapping.toml, and the result verified layer by
    layer.

    Several SRC, or a directory holding checkpoints (files sniffed, sorted; a TF checkpoint prefix
    or SavedModel directory is one source; a TF checkpoint directory itself is one source, pass
    DIR/*.index for each of its checkpoints): each is converted into the directory -o with the
    same options, detected once per structure, one line per file; exit 2 if any failed (the
    others are written). --verify, --inputs, --no-verify and drafting work on one source only."""
    from ..allocator import reuse_freed_buffers
    from ..batch import list_sources

    reuse_freed_buffers()  # this process streams tensors (see converter/allocator.py)

    if params["skip_existing"] and params["force"]:
        raise ConverterError(
            "--skip-existing leaves existing outputs as they are and --force overwrites them:"
            " pass one of them"
        )
    sources, skipped = list_sources(list(srcs))
    if len(srcs) > 1 or sources != list(srcs):  # several sources: cli/convert_many.py
        from .convert_many import run_batch

        return run_batch(sources, skipped, jobs, **params)
    return _convert_single(srcs[0], **params)


def _convert_single(
    src,
    to,
    output,
    src_format,
    mapping,
    source_model,
    num_classes,
    pooling,
    use_ema,
    source_bn_momentum,
    do_verify,
    accept_folded_bn,
    no_verify,
    verify_inputs,
    output_io,
    skip_existing,
    force,
    as_json,
) -> int:
    """``convert`` with one source (the command's docstring)."""
    from ..formats import check_output
    from ..model import check_spec

    if verify_inputs is not None and not do_verify:
        raise ConverterError("--inputs is for the verification: add --verify")

    if to is not None:
        check_spec(to)  # a bad --to names itself first, before the output check
    out = output or Path.cwd() / (src.name.split(".")[0] + ".safetensors")
    if skip_existing and out.is_file():
        return _skipped(src, out, as_json)
    out = check_output(out, force, (src,))
    from ..pipeline import drafted_table_path

    if mapping is None and may_draft(to):  # refuse an existing table before the long work
        check_output(drafted_table_path(out), force, (src,))
    console = stderr_console()
    options = dict(mapping=mapping, source_model=source_model, format=src_format)
    more = dict(num_classes=num_classes, pooling=pooling, use_ema=use_ema)
    more.update(source_bn_momentum=source_bn_momentum, accept_folded_bn=accept_folded_bn)
    more.update(output_io=output_io)
    result, written = _convert_with_progress(
        console, as_json, src, to, out, force, **more, **options
    )
    info = summary(result, written)
    verify_options = {**options, "pooling": pooling}
    report = _verification(src, result, written, verify_options, verify_inputs, info, do_verify,
                           no_verify)  # fmt: skip
    rc = report.return_code if report else EXIT_OK
    if as_json:
        emit_json(info)
    else:
        _print_summary(console, result, info, written, detected=to is None)
        if report is not None:
            _print_verification(console, report)
        if "verification_skipped" in info:
            console.print(f"  verification: not run ({info['verification_skipped']})")
    return rc


def _skipped(src: Path, out: Path, as_json: bool) -> int:
    """--skip-existing with an existing output: the batch's line (or JSON object) for it."""
    from rich.markup import escape

    from ..batch import FileOutcome
    from .convert_many import file_line

    outcome = FileOutcome(src, out, 0.0, skipped=True)
    if as_json:
        emit_json(outcome.to_dict())
    else:
        stderr_console().print(escape(file_line(outcome)))
    return EXIT_OK


NO_CONFIG_TO_RUN = (
    "the source stores no Keras model config to run; compare the outputs yourself, e.g. "
    "verify OUT --against a recording of the source's"
)


def _verification(src, result, written, options, inputs, info, do_verify, no_verify):
    """The verification after converting: --verify, or automatic after a drafted mapping when the
    source can be run (else why not, in ``info``)."""
    from ..pipeline import drafted_table_path

    auto = result.drafted is not None and not do_verify and not no_verify
    if result.drafted is not None:
        options["mapping"] = info["drafted_mapping"] = str(drafted_table_path(written))
        do_verify = do_verify or (auto and _source_runs(result))
        if auto and not do_verify:
            info["verification_skipped"] = NO_CONFIG_TO_RUN
    return _auto_verify(src, written, options, inputs, info, auto) if do_verify else None


def _auto_verify(src, written: Path, options: dict, inputs, info: dict, auto: bool):
    """The verification; when it only follows a drafted mapping (``auto``, not --verify) and the
    source cannot be run (a custom layer Keras does not know), said in ``info`` instead of failing
    the written conversion."""
    try:
        return _verify_written(src, written, options, inputs, info)
    except (VerificationError, UnsupportedLayerError) as exc:
        if not auto:
            raise
        info["verification_skipped"] = f"the source could not be run: {exc}"
        return None


def _verify_written(src, written: Path, options: dict, inputs, info: dict):
    """The layer-by-layer verification of the written output, its report also put in ``info``."""
    from ..verification import VerifyOptions, verify

    # the source options the conversion used; a head reset is read from the written metadata
    report = verify(src, written, VerifyOptions(inputs=inputs, **options))
    info["verification"] = report.to_dict()
    return report


def _convert_with_progress(console, as_json: bool, src, to, out, force: bool, **kwargs):
    """Run the conversion under a progress bar (terminal only) and write the output."""
    from ..pipeline import convert_file

    if as_json or not console.is_terminal:  # no bar to show: rich.progress is not imported
        return convert_file(src, out, to, force=force, **kwargs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("converting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        return convert_file(src, out, to, force=force, progress=progress, **kwargs)


def may_draft(to: str | None) -> bool:
    """Whether this conversion drafts its mapping when no table fits: ``to`` is the user's own
    module."""
    from ..specs import looks_like_spec, parse_spec

    return bool(to) and looks_like_spec(to) and not parse_spec(to).is_library


def _source_runs(result) -> bool:
    """Whether verification can run the source: a Keras config from the file or --source-model."""
    return result.config_origin in ("file", "model")


def _print_summary(console, result, info: dict, written: Path, detected: bool) -> None:
    if detected:
        console.print(
            f"detected [bold]{result.source_arch or 'custom model'}[/]; default target"
            f" [bold]{result.target}[/]"
        )
    console.print(
        f"wrote {written}: {info['tensors']} tensors for {result.target} (table {result.table_id})"
    )
    console.print(f"  layer config from: {result.config_origin}")
    if result.drafted is not None:
        console.print(
            f"  mapping drafted from both structures ({len(result.drafted.matches)} rules):"
            f" {info['drafted_mapping']} (review it; --mapping reuses it)"
        )
    for line in _details(result, info):
        console.print(f"  {line}")


def _details(result, info: dict) -> list[str]:
    """The summary's indented lines: BN settings, surgeries, preprocessing, head, nesting, notes."""
    lines = []
    if result.bn_config:
        lines.append(
            f"BatchNorm: {info['bn_modules']} modules, torch momentum"
            f" {momenta_str(info['bn_momentum_torch'])} (= 1 - {_convention(result)}), eps"
            f" {momenta_str(info['bn_eps'])}"
        )
    if info["surgeries"]:
        lines.append(f"surgeries (applied by converter.load_model): {', '.join(info['surgeries'])}")
    if result.preprocessing["steps"]:
        s = result.preprocessing
        lines.append(
            f"preprocessing moved out of the model: x_torch = x * {fmt_list(s['scale'])} +"
            f" {fmt_list(s['offset'])}"
        )
    if result.nesting:
        from ..nesting import Nesting

        lines.append(f"nested: {Nesting(**result.nesting).describe()}")
    if result.source_head:  # None for a custom source: no [head] known
        from ..nesting import Head

        lines.append(f"source head: {Head(**result.source_head).describe()}")
    lines += [f"note: {note}" for note in result.notes]
    if result.head_reset:
        lines.append(
            f"head reset: {result.head_reset['num_classes']} classes, dropped"
            f" {', '.join(result.head_reset['dropped_source_layers'])}"
        )
    return lines


def _convention(result) -> str:
    """Whose momentum the BN momentum is 1 minus (ONNX has Keras' convention)."""
    return "ONNX momentum" if result.metadata.get("source.format") == "onnx" else "Keras"


def _print_verification(console, report) -> None:
    from rich.markup import escape

    console.print(f"  verification: {'PASS' if report.passed else 'MISMATCH'}")
    for line in report.mismatch_lines():
        console.print(f"    {escape(line)}")
    for e in report.excluded:
        console.print(f"    not compared: {e['module']} ({e['reason']})")


def momenta_str(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def fmt_list(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
