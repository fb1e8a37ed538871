"""Shared CLI pieces: options, the one place errors are caught, stderr console, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from ..errors import ConverterError, ExitCode, cli_message

EXIT_OK, EXIT_FINDINGS, EXIT_ERROR = ExitCode.OK, ExitCode.FINDINGS, ExitCode.ERROR


def stderr_console():
    """A rich console on stderr (rich is used only inside the CLI). Off a terminal (a log, a pipe)
    nothing is wrapped or truncated: names and messages come out whole."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=True, highlight=False, width=100_000, soft_wrap=True)
    return console


def json_option(f: Callable) -> Callable:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print machine-readable JSON on stdout."
    )(f)


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
    """Run the click group: the one place errors are caught. ConverterError -> one line on stderr,
    exit 2; a bug -> one line, exit 70; SIGINT/SIGTERM/SIGHUP -> cleanup, exit 128+n.
    ``-v`` (parsed by
    the group into ``state``) adds the traceback."""
    from ..interrupts import Terminated, signals_raise

    args = list(sys.argv[1:] if argv is None else argv)
    state: dict[str, Any] = {"verbose": False}
    try:
        with signals_raise():
            rv = cli.main(args=args, prog_name="ckptport", standalone_mode=False, obj=state)
    except ConverterError as err:
        return _fail(state, f"error: {cli_message(err)}", err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        return _fail(state, "interrupted; temporary files removed", ExitCode.INTERRUPTED)
    except click.ClickException as err:
        err.show()
        return ExitCode.ERROR
    except Terminated as sig:
        return _fail(
            state, f"terminated (signal {sig.signum}); temporary files removed", sig.exit_code
        )
    except Exception as exc:  # a bug: still one line, never the "mismatch"/"findings" code
        return _fail(
            state,
            f"internal error: {type(exc).__name__}: {exc}; this is a bug in ckptport, "
            "rerun with -v and report the traceback",
            ExitCode.INTERNAL,
        )
    return int(rv) if isinstance(rv, int) else ExitCode.OK


def skip_native_teardown() -> Callable[[int], None]:
    """For the console script: returns ``leave(code)``, which exits with ``code``. A process that
    loaded libtorch then ends once Python's own shutdown (threads joined, every atexit handler run)
    is done, without the libraries' C++ static destructors: those fault in ~125 MiB of pages on the
    way out (``python -c "import torch"`` peaks at 510 MiB before them, 636 MiB after), which
    would set the peak RSS of a small conversion. Every output is closed by then; stdout and
    stderr are flushed here."""
    import atexit
    import os

    exit_code = [0]

    def last_handler() -> None:  # registered first, so it runs after every other handler
        if "torch" in sys.modules:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(exit_code[0])

    atexit.register(last_handler)

    def leave(code: int) -> None:
        exit_code[0] = code
        sys.exit(code)

    return leave


def _fail(state: dict[str, Any], line: str, code: int) -> int:
    if state.get("verbose"):
        import traceback

        traceback.print_exc()
    click.echo(line, err=True)
    return int(code)
