"""glibc malloc settings for a process that streams tensors: the CLI's ``convert`` and its batch
workers. The library never changes them in a caller's process."""

from __future__ import annotations

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest: buffers above it stay fresh mappings
TRIM_THRESHOLD = 2**30


def reuse_freed_buffers() -> bool:
    """Let a freed tensor buffer serve the next one instead of going back to the kernel.

    By default glibc maps each allocation above its (dynamic) mmap threshold freshly and unmaps it
    when freed, and trims the heap's free top: every layer's buffers then fault their pages in
    again, ~1 ms per MiB on the standard machine, about 0.15 s of a ResNet101 conversion's 1 s.
    With the threshold fixed at its maximum and trimming only above 1 GiB free, the buffers of
    one layer are reused by the next; peak RSS stays that of the largest layer's buffers
    (docs/benchmarks.md). Returns whether it applied (glibc only)."""
    import ctypes

    from .libc import function

    mallopt = function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
