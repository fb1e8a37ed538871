"""Start the kernel's writeback of a file range as soon as it is written (Linux
``sync_file_range(SYNC_FILE_RANGE_WRITE)``: no waiting, no durability promise), as PostgreSQL's
``*_flush_after`` settings and RocksDB's ``bytes_per_sync`` do.

Without it a streamed output's dirty pages pile up until the end: replacing an existing file
then makes ext4 allocate and submit all of them in the renaming thread (its ``auto_da_alloc``
guard against empty files after a crash: ~0.12 s for a 171 MiB output, on the conversion's
critical path), and a batch of outputs meets the kernel's dirty-page throttling in bursts. Started
from the writer thread, the same work overlaps the conversion.
"""

from __future__ import annotations

import ctypes

from ..libc import function

SYNC_FILE_RANGE_WRITE = 2
_ARGS = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``[offset, offset + length)`` of ``fd`` to disk, without
    waiting for it. Where that is not possible (another OS, a file system that refuses), nothing
    happens: the data is written as it would have been, later."""
    fn = function("sync_file_range", *_ARGS)
    if fn is not None:
        fn(fd, offset, length, SYNC_FILE_RANGE_WRITE)  # a failure changes no data: ignored
