"""ckptport draft SRC --to SPEC -o TABLE.toml"""

from __future__ import annotations

from pathlib import Path

import click

from .common import EXIT_OK, emit_json, force_option, json_option, stderr_console


@click.command("draft")
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    required=True,
    metavar="SPEC",
    help="Your PyTorch module, e.g. path/to/model.py:factory (or any model spec).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Table to write (TOML). Default: ./<src>.mapping.toml",
)
@click.option(
    "--format", "src_format", metavar="NAME", help="Force the source format (`ckptport inspect`)."
)
@click.option(
    "--source-model",
    metavar="MODULE:FUNCTION",
    help="Your code that builds the Keras model, for files without config.",
)
@force_option
@json_option
def command(src, to, output, src_format, source_model, force, as_json) -> int:
    """Draft a mapping table from the structure of SRC and of the target module: one explicit
    rule per layer, to review and pass to `convert --mapping`."""
    from ..drafting import draft
    from ..formats import check_output
    from ..model import check_spec

    if to is not None:
        check_spec(to)  # a bad --to names itself first, before the output check
    out = check_output(
        output or Path.cwd() / (src.name.split(".")[0] + ".mapping.toml"), force, (src,)
    )
    drafted = draft(src, to, source_model=source_model, format=src_format)
    written = drafted.write(out, force=force)
    if as_json:
        emit_json(
            {"output": str(written), "target": to, "rules": drafted.rows(), "notes": drafted.notes}
        )
        return EXIT_OK
    from rich.markup import escape

    console = stderr_console()
    console.print(f"wrote {written}: {len(drafted.matches)} rules for {to}")
    for row in drafted.rows():
        extra = f" {row['args']}" if "args" in row else ""
        extra += f", bias folded into {row['fold_bias']}" if "fold_bias" in row else ""
        console.print(
            escape(
                f"  {row['source_layer']} ({row['source_class']}) -> {row['target_module']}"
                f" ({row['target_class']}) [{row['transform']}]{extra}"
            )
        )
    for note in drafted.notes:
        console.print(escape(f"  note: {note}"))
    console.print(f"  use it: ckptport convert {src} --mapping {written} -o OUT.safetensors")
    return EXIT_OK
