"""Big sources (issue 12): a .keras member is read in place (never whole into memory), resolution
and table selection read no tensor data, and a sharded TF checkpoint converts like the unsharded
one. No Keras subprocess of their own: pure h5py/zipfile archives and the cached MobileNetV3Small
fixture that test_convert_e2e.py builds in every format (fixtures/tf_bundle_writer.py reshards its
TF checkpoint)."""

from __future__ import annotations

import io
import sys
import tempfile
import zipfile

import h5py
import numpy as np
import pytest

from helpers import ALL_FORMATS, ROOT, assert_clean_error, keras_build_args, make_keras_fixture
from helpers import run_cli

sys.path.insert(0, str(ROOT / "fixtures"))

MEMBER = "model.weights.h5"


@pytest.fixture(scope="module")
def mnv3() -> dict:
    fn, kwargs, inp = keras_build_args("keras:MobileNetV3Small")
    return make_keras_fixture(fn, kwargs, inp, ALL_FORMATS)  # test_convert_e2e's fixture


def _weights_member() -> tuple[bytes, dict[str, np.ndarray]]:
    """A Keras 3 weights file (one top-level and one nested layer) as bytes, and its arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "layers/dense/vars/0": rng.standard_normal((300, 200)).astype(np.float32),
        "layers/dense/vars/1": rng.standard_normal(200).astype(np.float32),
        "layers/functional/layers/conv2d/vars/0": rng.standard_normal((3, 3, 4, 8)),
    }
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for key, value in arrays.items():
            f[key] = value
    return buf.getvalue(), arrays


def _archive(path, member: bytes, compression: int):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        zf.writestr("metadata.json", "{}")
        zf.writestr("config.json", "{}")
        zf.writestr(MEMBER, member)
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_keras_member_is_never_read_whole(compression, tmp_path, monkeypatch):
    """Stored (what Keras writes): h5py reads a window onto the archive, nothing extracted;
    compressed: streamed to a temporary file. Either way every tensor reads back exactly."""
    from converter import formats

    member, arrays = _weights_member()
    src = _archive(tmp_path / "m.keras", member, compression)
    real_read = zipfile.ZipFile.read

    def read(self, name, pwd=None):
        assert name != MEMBER, "the weights member was read whole into memory"
        return real_read(self, name, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "read", read)
    if compression == zipfile.ZIP_STORED:
        monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **k: pytest.fail("extracted"))
    raw = formats.read(src)
    assert raw.format == "keras" and sorted(raw.tensors) == sorted(arrays)
    for key, value in arrays.items():
        np.testing.assert_array_equal(raw.tensors[key].load(), value)


def test_damaged_compressed_keras_member_says_so(tmp_path, capsys):
    """A compressed member that is not HDF5, and a stored and a compressed member whose bytes are
    damaged (the zip CRC, checked as zipfile does on extraction): one line each."""
    member, _ = _weights_member()
    bad_h5 = _archive(tmp_path / "bad_h5.keras", member[:1000], zipfile.ZIP_DEFLATED)
    bad_crc = tmp_path / "bad_crc.keras"
    _archive(bad_crc, member, zipfile.ZIP_STORED)
    data = bytearray(bad_crc.read_bytes())
    with zipfile.ZipFile(bad_crc) as zf:
        info = zf.getinfo(MEMBER)
    data[info.header_offset + 30 + len(MEMBER) + 5000] ^= 0xFF  # inside the member's bytes
    bad_crc.write_bytes(bytes(data))
    deflated = tmp_path / "bad_crc_deflated.keras"
    with zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "{}")
        zf.writestr(MEMBER, member)
    data = bytearray(deflated.read_bytes())
    with zipfile.ZipFile(deflated) as zf:
        info = zf.getinfo(MEMBER)
    data[info.header_offset + 30 + len(MEMBER) + info.compress_size // 2] ^= 0xFF
    deflated.write_bytes(bytes(data))
    for src, needle in [
        (bad_h5, "its member model.weights.h5 is truncated or not a valid HDF5"),
        (bad_crc, "is a damaged .keras archive (Bad CRC-32"),
        (deflated, "is a damaged .keras archive"),
    ]:
        rc, _, err = run_cli(["inspect", src], capsys)
        assert_clean_error(rc, err, src.name, needle)


class _Stop(Exception):
    """Raised by the first progress call: the first layer's tensors are about to be read."""


# one format per way a source is resolved: a stored config, shapes against the manifests, a TF
# object graph, TF1 variable names (the other formats take one of these ways: suite time)
RESOLUTIONS = ["keras", "h5-weights", "tf-checkpoint", "tf-names"]


@pytest.mark.parametrize("fmt", RESOLUTIONS)
def test_resolution_and_selection_read_no_tensor_data(fmt, mnv3, monkeypatch):
    """Everything before the first layer is mapped (read, resolve the structure, pick the table
    and target, build the target manifest) works from names, shapes and dtypes: no tensor
    loaded, no HDF5 dataset or bundle tensor read (a TF checkpoint's object graph is structure)."""
    import converter
    from converter.formats import RawTensor, tf_bundle

    reads: list[str] = []
    load, getitem, load_tensor = RawTensor.load, h5py.Dataset.__getitem__, tf_bundle.load_tensor

    def counted_load(self):
        reads.append(self.key)
        return load(self)

    def counted_getitem(self, *args):
        reads.append(self.name)
        return getitem(self, *args)

    def counted_load_tensor(prefix, entry, *args, **kwargs):
        if entry.name != "_CHECKPOINTABLE_OBJECT_GRAPH":
            reads.append(entry.name)
        return load_tensor(prefix, entry, *args, **kwargs)

    monkeypatch.setattr(RawTensor, "load", counted_load)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", counted_getitem)
    monkeypatch.setattr(tf_bundle, "load_tensor", counted_load_tensor)

    def stop(done, total, name):
        raise _Stop

    with pytest.raises(_Stop):
        converter.convert(mnv3["files"][fmt], progress=stop)
    assert reads == []


def test_sharded_tf_checkpoint_converts_like_the_unsharded_one(mnv3, tmp_path):
    """The fixture's checkpoint resharded over 3 data files (pure Python) converts to the same
    state dict."""
    import converter
    from converter.formats import tf_bundle
    from tf_bundle_writer import reshard

    src = mnv3["files"]["tf-checkpoint"]
    sharded = reshard(src, tmp_path / "sharded" / "ckpt", 3)
    assert tf_bundle.read_header(sharded).num_shards == 3
    assert len(list(sharded.parent.glob("ckpt.data-*-of-00003"))) == 3
    want = converter.convert(src).state_dict
    got = converter.convert(sharded).state_dict
    assert list(got) == list(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


TF1_TWIN = """
import torch
from torch import nn


def twin():
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.BatchNorm1d(16, eps=1e-3),
                         nn.Linear(16, 8))


def twin_reading_a_value():
    assert int(torch.tensor([16]).sum().item()) == 16  # no values on the meta device
    return twin()
"""


@pytest.mark.parametrize("factory", ["twin", "twin_reading_a_value"])
def test_tf1_dense_checkpoint_in_shards_drafts_onto_a_users_module(factory, tmp_path):
    """Variable names only (no config, no .meta graph, 3 shards): the layers are inferred, the
    dummy input's width read from the first Dense kernel, and the draft maps every tensor; a
    module whose factory reads a tensor's value (it cannot be built on the meta device) is built
    the ordinary way for the draft, the target manifest and load_model."""
    import converter
    from tf_bundle_writer import write_bundle

    rng = np.random.default_rng(0)
    arrays = {
        "layer_0/kernel": rng.standard_normal((24, 16)).astype(np.float32),
        "layer_0/bias": rng.standard_normal(16).astype(np.float32),
        "layer_1/gamma": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "layer_1/beta": rng.standard_normal(16).astype(np.float32),
        "layer_1/moving_mean": rng.standard_normal(16).astype(np.float32),
        "layer_1/moving_variance": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        "layer_2/kernel": rng.standard_normal((16, 8)).astype(np.float32),
        "layer_2/bias": rng.standard_normal(8).astype(np.float32),
    }
    prefix = write_bundle(tmp_path / "ckpt" / "model", arrays.items(), num_shards=3)
    (tmp_path / "twin.py").write_text(TF1_TWIN)
    spec = f"{tmp_path / 'twin.py'}:{factory}"
    result = converter.convert(prefix, spec, source_bn_momentum=0.99)
    sd = result.state_dict
    np.testing.assert_array_equal(sd["0.weight"], arrays["layer_0/kernel"].T)
    np.testing.assert_array_equal(sd["2.running_var"], arrays["layer_1/moving_variance"])
    np.testing.assert_array_equal(sd["3.bias"], arrays["layer_2/bias"])
    assert result.bn_config["2"]["momentum"] == pytest.approx(0.01)
    model = converter.load_model(result.save(tmp_path / "out.safetensors"))
    assert model[2].momentum == pytest.approx(0.01) and model[2].eps == 1e-3
    np.testing.assert_array_equal(model[3].bias.detach().numpy(), arrays["layer_2/bias"])


def test_early_writeback_never_fails_a_write(tmp_path):
    """Starting writeback is advice: on a file, a pipe (the call fails there) or a closed
    descriptor it raises nothing and changes no byte."""
    import os
    import sys

    from converter.formats.writeback import _ARGS, start_writeback
    from converter.libc import function

    if sys.platform.startswith("linux"):  # the call is made there, not silently skipped
        assert function("sync_file_range", *_ARGS) is not None

    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        start_writeback(fh.fileno(), 0, len(data))
    read_end, write_end = os.pipe()
    start_writeback(write_end, 0, 4096)
    os.close(read_end)
    os.close(write_end)
    start_writeback(write_end, 0, 4096)  # closed: EBADF, ignored
    assert path.read_bytes() == data
