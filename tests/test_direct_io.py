"""Direct output I/O (converter/formats/direct_io.py): every write aligned, the bytes those of a
buffered write, the policy deciding once per command, the file system's refusal handled."""

from __future__ import annotations

import ctypes
import os
import random

import numpy as np
import pytest

from converter.errors import ConverterError
from converter.formats import direct_io
from converter.formats.direct_io import BLOCK, DirectFile, choose, open_direct
from converter.formats.safetensors_file import Layout, SafetensorsStream


def _ranges(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """``[0, size)`` cut into ranges of mixed sizes (within one block, across two, many blocks
    with ragged ends), shuffled: what a streamed conversion writes."""
    cuts, at = [], 0
    while at < size:
        n = rng.choice([1, 7, 100, BLOCK - 3, BLOCK, 3 * BLOCK + 5, 70_000])
        cuts.append((at, min(size, at + n)))
        at += n
    rng.shuffle(cuts)
    return cuts


@pytest.fixture
def aligned_writes(monkeypatch):
    """Every ``os.pwrite`` the direct file makes, checked as ``O_DIRECT`` demands: offset, length
    and buffer address multiples of the block (on any file system: the fd needs no O_DIRECT)."""
    seen = []
    pwrite, preadv = os.pwrite, os.preadv

    def aligned(data, offset) -> int:
        view = memoryview(data)
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        assert offset % BLOCK == 0 and view.nbytes % BLOCK == 0 and address % BLOCK == 0
        return view.nbytes

    def checked_write(fd, data, offset):
        seen.append((offset, aligned(data, offset)))
        return pwrite(fd, data, offset)

    def checked_read(fd, buffers, offset):
        assert len(buffers) == 1 and aligned(buffers[0], offset)
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(direct_io.os, "pwrite", checked_write)
    monkeypatch.setattr(direct_io.os, "preadv", checked_read)
    return seen


@pytest.mark.parametrize("size", [BLOCK * 3, 50_001, 300_000])
def test_any_ranges_in_any_order_make_the_same_bytes_aligned(size, tmp_path, aligned_writes):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f"
    path.write_bytes(b"")
    direct = DirectFile(os.open(path, os.O_WRONLY), size, path)
    for start, end in _ranges(size, random.Random(size)):
        direct.write(memoryview(data)[start:end], start)
    direct.finish()
    direct.close()
    assert path.read_bytes() == data
    assert aligned_writes  # it wrote, and every write was checked
    assert sum(n for _, n in aligned_writes) == -(-size // BLOCK) * BLOCK  # each block once


def test_ranges_written_again_end_with_their_last_bytes(tmp_path, aligned_writes, monkeypatch):
    """A tensor adjusted after it was placed (a conv bias folded into a streamed running mean) is
    written again: over edge blocks still being filled, filled and waiting, or already on disk
    (read back, patched, written again)."""
    size, rng = 200_003, random.Random(7)
    want = bytearray(np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes())
    read_back, read_block = [], DirectFile._read_block

    def spied(direct: DirectFile, index: int) -> bytearray:
        read_back.append(index)
        return read_block(direct, index)

    monkeypatch.setattr(DirectFile, "_read_block", spied)
    path = tmp_path / "f"
    path.write_bytes(b"")
    direct = DirectFile(os.open(path, os.O_WRONLY), size, path)
    ranges = _ranges(size, rng)

    def again(a: int, b: int) -> None:
        want[a:b] = bytes(rng.randrange(256) for _ in range(b - a))
        direct.write(memoryview(bytes(want))[a:b], a, again=True)

    for n, (start, end) in enumerate(ranges):
        direct.write(memoryview(bytes(want))[start:end], start)
        if n == len(ranges) // 2:
            direct.flush()  # the filled edge blocks go to disk mid-way
            for a, b in ranges[: n + 1]:
                again(a, b)
        elif n % 3 == 0:  # an earlier range (maybe this one)
            again(*ranges[rng.randrange(n + 1)])
    direct.finish()
    direct.close()
    assert path.read_bytes() == bytes(want)
    assert read_back  # blocks on disk were patched


def test_a_block_never_filled_is_a_bug_not_a_short_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"")
    direct = DirectFile(os.open(path, os.O_WRONLY), 2 * BLOCK, path)
    direct.write(memoryview(b"x" * 10), 0)
    with pytest.raises(RuntimeError, match=r"blocks \[0\] were never filled"):
        direct.finish()
    direct.close()


def _tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    dtypes = ["float32", "float16", "int64"]
    return {
        f"t{k:03d}": rng.standard_normal(tuple(rng.integers(1, 300, size=rng.integers(1, 4))))
        .astype(dtypes[k % 3])
        for k in range(int(rng.integers(1, 40)))
    }


def _stream(path, layout, tensors, order, metadata, direct: bool) -> bytes:
    path.write_bytes(b"")
    stream = SafetensorsStream(path, layout, direct=direct)
    assert (stream.direct is not None) == direct  # this file system takes direct I/O
    for n, key in enumerate(order):
        stream.put(key, tensors[key])
        back = order[n // 2]  # a tensor read back while the file is being written
        np.testing.assert_array_equal(stream.get(back), tensors[back])
    stream.finish(metadata)
    return path.read_bytes()


@pytest.mark.parametrize("seed", range(8))
def test_a_direct_stream_writes_the_bytes_of_a_buffered_one(seed, tmp_path):
    """On the real file system with O_DIRECT (the test directory's must take it): random
    tensors put in random order, some read back mid-way, metadata that fits the header's room
    or outgrows it (the data is then moved once)."""
    rng = np.random.default_rng(seed)
    tensors = _tensors(rng)
    layout = Layout.plan({k: (str(a.dtype), a.shape) for k, a in tensors.items()})
    order = list(tensors)
    random.Random(seed).shuffle(order)
    metadata = {"note": "x" * (40_000 if seed % 4 == 0 else seed)}
    buffered = _stream(tmp_path / "b", layout, tensors, order, metadata, direct=False)
    assert _stream(tmp_path / "d", layout, tensors, order, metadata, direct=True) == buffered


def test_a_file_system_without_direct_io_is_written_buffered(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")  # what tmpfs and others answer
        return real(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", no_direct)
    path = tmp_path / "f"
    path.write_bytes(b"")
    assert open_direct(path, 10_000) is None
    layout = Layout.plan({"a": ("float32", (3,))})
    stream = SafetensorsStream(path, layout, direct=True)
    assert stream.direct is None
    stream.put("a", np.arange(3, dtype=np.float32))
    stream.finish({})
    assert path.stat().st_size == 8 + layout.room + 12


def test_the_policy(monkeypatch):
    monkeypatch.setattr(direct_io, "dirty_background_bytes", lambda: 1000)
    assert choose("auto", 1001) and not choose("auto", 1000)
    assert choose("direct", 1) and not choose("buffered", 10**12)
    with pytest.raises(ConverterError, match="'fast'.*auto, direct, buffered"):
        choose("fast", 1)


def test_the_kernels_threshold_is_read():
    if not os.path.exists("/proc/sys/vm/dirty_background_ratio"):
        pytest.skip("not Linux")
    threshold = direct_io.dirty_background_bytes()
    assert 0 < threshold < 2**63 - 1


def test_a_bad_mode_is_refused_before_the_source_is_read(tmp_path):
    from converter import convert_file

    with pytest.raises(ConverterError, match="output I/O mode 'fast'"):
        convert_file(tmp_path / "missing.weights.h5", tmp_path / "o.safetensors", output_io="fast")
