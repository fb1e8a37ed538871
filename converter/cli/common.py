"""Shared CLI pieces: options, the one place errors are caught, stderr console, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from ..errors import ConverterError

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


def stderr_console():
    """A rich console on stderr (rich is used only inside the CLI)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout.")(f)


def force_option(f: Callable) -> Callable:
    return click.option("--force", is_flag=True, help="Overwrite an existing output file.")(f)


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def run_main(cli: click.Group, argv: list[str] | None) -> int:
    """Run the click group; ConverterError -> one line on stderr, exit 2 (traceback with -v)."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    try:
        rv = cli.main(args=args, prog_name="ckptport", standalone_mode=False)
    except ConverterError as err:
        if verbose:
            import traceback

            traceback.print_exc()
        click.echo(f"error: {err}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except click.ClickException as err:
        err.show()
        return EXIT_ERROR
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return rv if isinstance(rv, int) else EXIT_OK
