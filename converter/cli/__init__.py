"""The ``ckptport`` command. Subcommands live one per module and are imported only when run,
so ``ckptport --help`` imports neither tensorflow nor torch."""

from __future__ import annotations

import importlib

import click

from .common import run_main, skip_native_teardown

# name -> (module, one-line help). Help text is here so `--help` needs no subcommand import.
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("converter.cli.convert", "Convert a Keras/TF checkpoint to a PyTorch state dict."),
    "draft": (
        "converter.cli.draft",
        "Draft a mapping table onto your own PyTorch module, from both structures.",
    ),
    "verify": (
        "converter.cli.verify",
        "Run source and converted model and compare layer by layer.",
    ),
    "inspect": (
        "converter.cli.inspect",
        "List layers, tensors, shapes, dtypes and BN config of a file.",
    ),
    "archs": (
        "converter.cli.archs",
        "List mapping tables: source architectures, targets, surgeries.",
    ),
    "audit": ("converter.cli.audit", "Check a PyTorch model or checkpoint for BatchNorm mistakes."),
    "recalibrate": (
        "converter.cli.recalibrate",
        "Recompute BN running stats as a true average (precise BN).",
    ),
    "port": (
        "converter.cli.port",
        "Write a readable PyTorch module and its weights from a Keras model.",
    ),
    "export": (
        "converter.cli.export",
        "Export a converted checkpoint to ONNX, checked in onnxruntime.",
    ),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[name][0])
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptport", prog_name="ckptport")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks and debug details on errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: bool) -> None:
    """ckptport: convert TensorFlow/Keras checkpoints to PyTorch, with BatchNorm done right."""
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    return run_main(cli, argv)


def entry() -> None:
    """The console script (and ``python -m converter``): main(), then exit without libtorch's
    exit-time destructors (see skip_native_teardown)."""
    leave = skip_native_teardown()
    leave(main())
