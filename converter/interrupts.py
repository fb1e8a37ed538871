"""Catchable termination signals become an exception, so every ``finally``/``except BaseException``
cleanup runs (temporary files, temporary directories, child processes) before the process exits.

Batch schedulers, ``timeout`` and container stops send SIGTERM; a closed terminal sends SIGHUP.
Python's default for both is to die on the spot, leaving ``.partial`` files behind. The CLI runs
every command inside :func:`signals_raise`; :func:`converter.formats.write_atomic` does too, for
library callers that installed no handler of their own.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = tuple(
    s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None
)


class Terminated(BaseException):
    """A termination signal arrived (a BaseException, like KeyboardInterrupt: not an error to
    report)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`Terminated` (main thread only; handlers that
    someone else installed are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    mine = [s for s, h in previous.items() if h in (signal.SIG_DFL, None)]
    for s in mine:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s in mine:
            signal.signal(s, previous[s])
