"""The C library's functions that Python does not wrap (glibc's ``mallopt``, Linux's
``sync_file_range``), looked up once: ``None`` where this platform has none, so that callers
degrade to doing nothing."""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def function(name: str, *argtypes: Any) -> Any:
    """The C library's ``name`` returning an int and taking ``argtypes``, or None where the
    process's C library has no such function (another OS, musl)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn
