"""``ckptport recalibrate CKPT --data DATA -o OUT``: recompute BN running stats (precise BN).

The checkpoint is one ckptport wrote; the output is the same checkpoint with new running
statistics and a ``recalibrated`` metadata record. The input file is never touched.
"""

from __future__ import annotations

from typing import Any

import click

from .common import EXIT_OK, emit_json, force_option, json_option, stderr_console


@click.command("recalibrate")
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.option(
    "--data",
    "data_path",
    required=True,
    help=(
        "Model inputs: a .npy (N, ...) array, a .npz (one array, or --key) or a folder of "
        "one-sample .npy files; float, preprocessed as the PyTorch model expects."
    ),
)
@click.option(
    "--num-batches", type=click.IntRange(min=1), required=True, help="Batches to average over."
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    required=True,
    help="Samples per batch (the batch size the model trains with is a good choice).",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Output checkpoint (.safetensors or .pt).",
)
@click.option("--key", default=None, help="Array name inside a .npz.")
@click.option(
    "--shuffle/--no-shuffle",
    default=True,
    show_default=True,
    help="Draw batches at random (class-sorted data otherwise biases the variance).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle.")
@click.option(
    "--device", default="cpu", show_default=True, help="Torch device for the forward passes."
)
@force_option
@json_option
def command(
    ckpt: str,
    data_path: str,
    num_batches: int,
    batch_size: int,
    output: str,
    key: str | None,
    shuffle: bool,
    seed: int,
    device: str,
    force: bool,
    as_json: bool,
) -> int:
    """Recompute the BN running stats of CKPT as the true average over --num-batches batches.

    Weights stay fixed; only BN modules run in train mode (dropout etc. off), without gradients.
    Writes OUT with the new statistics; CKPT is never modified.
    """
    from ..bn import recalibrate_checkpoint

    result = recalibrate_checkpoint(
        ckpt,
        data_path,
        output,
        num_batches=num_batches,
        batch_size=batch_size,
        key=key,
        shuffle=shuffle,
        seed=seed,
        device=device,
        force=force,
    )
    src, written = result["input"], result["output"]
    if as_json:
        emit_json(result)
    else:
        _print_changes(result)
        click.echo(
            f"recalibrated {len(result['modules'])} BN modules of {src} over {num_batches} batches"
            f" of {batch_size}; wrote {written}"
            + (f" ({len(result['skipped'])} skipped)" if result["skipped"] else "")
        )
    return EXIT_OK


def _print_changes(result: dict[str, Any], top: int = 10) -> None:
    from rich.markup import escape
    from rich.table import Table

    rows = sorted(result["changes"].items(), key=lambda kv: -kv[1]["var"])[:top]
    table = Table(title=f"largest running-stat changes (top {min(top, len(rows))} by variance)")
    table.add_column("module")
    table.add_column("max |Δ mean|", justify="right")
    table.add_column("max |Δ var| / var", justify="right")
    for name, ch in rows:
        table.add_row(escape(name), f"{ch['mean']:.4g}", f"{ch['var']:.4g}")
    for name, why in result["skipped"].items():
        table.add_row(escape(name), "skipped", escape(why))
    stderr_console().print(table)
