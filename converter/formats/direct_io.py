"""Writing an output around the page cache (Linux ``O_DIRECT``), when a command writes more than
the page cache should absorb.

A buffered write copies the data into freshly allocated page-cache pages, which the kernel writes
to disk later; the command can end before the disk has its data. Once a command writes more than
the kernel lets pile up dirty (``vm.dirty_background_bytes``, or ``dirty_background_ratio`` of the
available memory), the kernel writes back while the command runs, which is then paced by the disk
either way, and gigabytes of outputs nobody reads next evict what the page cache held. Direct I/O
hands the data to the disk from one reused, aligned buffer instead: no page-cache copy, no
eviction. On the standard machine, a VM whose fresh page-cache pages cost ~3 ms per MiB to fault
in, a 98 MiB buffered write takes 0.30 s of CPU and a direct one 0.08 s of disk time
(docs/benchmarks.md).

``O_DIRECT`` wants offsets, lengths and memory aligned to the device's block. A safetensors
stream writes tensors at arbitrary byte offsets in any order, so :class:`DirectFile` writes each
range's whole blocks at once (through the aligned buffer) and keeps the partial blocks at its
edges until the neighbouring ranges complete them.

``choose(mode, total_bytes)`` is the one policy: ``direct``, ``buffered``, or ``auto`` (direct
when ``total_bytes`` exceeds the kernel's dirty-background threshold)."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ..errors import ConverterError

MODES = ("auto", "direct", "buffered")
BLOCK = 4096  # a multiple of every common device's logical block (512 or 4096)
BUFFER_BYTES = 8 << 20  # the aligned buffer every direct write goes through
READY_BLOCKS = 256  # completed edge blocks written together once this many wait


def check_mode(mode: str) -> str:
    """``mode``, refused unless it is one of ``MODES``."""
    if mode not in MODES:
        raise ConverterError(f"output I/O mode {mode!r}: expected one of {', '.join(MODES)}")
    return mode


def choose(mode: str, total_bytes: int) -> bool:
    """Whether to write ``total_bytes`` of output with direct I/O under ``mode`` (one of
    ``MODES``); never where the platform has no ``O_DIRECT``."""
    if not hasattr(os, "O_DIRECT") or check_mode(mode) == "buffered":
        return False
    return mode == "direct" or total_bytes > dirty_background_bytes()


def dirty_background_bytes() -> int:
    """How many dirty bytes the kernel lets pile up before it starts writing back (Linux
    ``vm.dirty_background_bytes``, or ``dirty_background_ratio`` percent of the available
    memory); the largest int where that cannot be read."""
    try:
        fixed = int(Path("/proc/sys/vm/dirty_background_bytes").read_text())
        if fixed > 0:
            return fixed
        ratio = int(Path("/proc/sys/vm/dirty_background_ratio").read_text())
        return ratio * _available_bytes() // 100
    except (OSError, ValueError):
        return 2**63 - 1


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no MemAvailable in /proc/meminfo")


def open_direct(path: Path, size: int) -> "DirectFile | None":
    """``path`` (an existing file that will be ``size`` bytes) open for direct writes, or None
    where its file system takes no direct I/O (tmpfs, some network file systems): one block is
    written as a probe, at offset 0, which the caller overwrites later."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None
    direct = DirectFile(fd, size, path)
    try:
        os.pwrite(fd, memoryview(direct.buffer)[:BLOCK], 0)
    except OSError:
        direct.close()
        return None
    return direct


_BUFFERS: list[mmap.mmap] = []  # aligned buffers of closed files, for the next (a batch's)


def _take_buffer() -> mmap.mmap:
    """A page-aligned buffer of ``BUFFER_BYTES``: one a closed file left (its pages already
    faulted in), else a new one."""
    try:
        return _BUFFERS.pop()
    except IndexError:
        return mmap.mmap(-1, BUFFER_BYTES)


class DirectFile:
    """A file written with ``O_DIRECT`` at any byte offsets, in any order: ``write`` writes the
    range's whole blocks at once and stages its partial edge blocks until the ranges beside them
    fill them (each byte written once, or ``again``: a range rewritten); ``finish`` checks that
    every block was written and cuts the file to ``size``. Not thread-safe: one writer thread
    uses it."""

    def __init__(self, fd: int, size: int, path: Path) -> None:
        self.fd, self.size, self.path = fd, size, path
        self.buffer = _take_buffer()
        self.edges: dict[int, list] = {}  # block index -> [bytearray(BLOCK), bytes filled]
        self.ready: dict[int, bytearray] = {}  # filled edge blocks not written yet

    def write(self, data: memoryview, offset: int, again: bool = False) -> None:
        """Write ``data`` (bytes) at ``offset``; ``again``: over a range written before (a
        tensor adjusted after it was placed)."""
        end = offset + len(data)
        first, last = -(-offset // BLOCK) * BLOCK, end // BLOCK * BLOCK  # the whole blocks
        if first >= last:
            self._stage(data, offset, again)
            return
        self._stage(data[: first - offset], offset, again)
        self._write_blocks(data[first - offset : last - offset], first)
        self._stage(data[last - offset :], last, again)

    def flush(self, partial: bool = False) -> None:
        """Write the filled edge blocks, and with ``partial`` those still being filled too (their
        missing bytes as zeros; they are written again once filled): before the file is read."""
        blocks = dict(self.ready)
        if partial:
            blocks.update({index: edge[0] for index, edge in self.edges.items()})
        self._write_runs(blocks)
        self.ready.clear()

    def finish(self) -> None:
        """Write what is staged, then cut the file to its size (its last block was written
        whole); a block never filled is a caller's bug."""
        self.flush()
        if self.edges:
            missing = sorted(self.edges)[:5]
            raise RuntimeError(f"direct write: blocks {missing} were never filled")
        os.ftruncate(self.fd, self.size)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _BUFFERS.append(self.buffer)

    def _stage(self, data: memoryview, offset: int, again: bool) -> None:
        """Copy ``data`` (within at most two blocks) into its staged edge blocks (``again``:
        bytes counted before; a block filled since is patched, read back if it was written)."""
        while len(data):
            index, start = divmod(offset, BLOCK)
            n = min(len(data), BLOCK - start)
            if again and index not in self.edges:
                block = self.ready.get(index) or self._read_block(index)
                block[start : start + n] = data[:n]
                self.ready[index] = block
            else:
                edge = self.edges.setdefault(index, [bytearray(BLOCK), 0])
                edge[0][start : start + n] = data[:n]
                edge[1] += 0 if again else n
                if edge[1] == min(BLOCK, self.size - index * BLOCK):
                    self.ready[index] = self.edges.pop(index)[0]
            data, offset = data[n:], offset + n
        if len(self.ready) >= READY_BLOCKS:
            self.flush()

    def _read_block(self, index: int) -> bytearray:
        """A block written before, read back (through the aligned buffer; rare: a tensor written
        again, its edge block already on disk)."""
        view = memoryview(self.buffer)[:BLOCK]
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        try:
            if os.preadv(fd, [view], index * BLOCK) != BLOCK:
                raise OSError(f"{self.path}: block {index} reads back short")
        finally:
            os.close(fd)
        block = bytearray(view)
        view.release()
        return block

    def _write_runs(self, blocks: dict[int, bytearray]) -> None:
        """Write ``blocks`` (index -> contents), each run of consecutive ones in one write."""
        run: list[int] = []
        for index in sorted(blocks):
            if run and (index != run[-1] + 1 or len(run) * BLOCK == BUFFER_BYTES):
                self._write_run(run, blocks)
                run = []
            run.append(index)
        if run:
            self._write_run(run, blocks)

    def _write_run(self, run: list[int], blocks: dict[int, bytearray]) -> None:
        for n, index in enumerate(run):
            self.buffer[n * BLOCK : (n + 1) * BLOCK] = blocks[index]
        self._pwrite_all(len(run) * BLOCK, run[0] * BLOCK)

    def _write_blocks(self, data: memoryview, offset: int) -> None:
        """Write whole blocks (``offset`` and ``len(data)`` aligned) through the buffer."""
        for start in range(0, len(data), BUFFER_BYTES):
            piece = data[start : start + BUFFER_BYTES]
            self.buffer[: len(piece)] = piece
            self._pwrite_all(len(piece), offset + start)

    def _pwrite_all(self, length: int, offset: int) -> None:
        view, done = memoryview(self.buffer), 0
        while done < length:
            done += os.pwrite(self.fd, view[done:length], offset + done)
