"""The pure-Python TensorFlow tensor-bundle reader against TensorFlow's own reader.

Checkpoints are written at run time by TensorFlow in a subprocess (the test process never imports
tensorflow, see tests/conftest.py), which also dumps what ``tf.train.list_variables`` and
``tf.train.load_checkpoint(...).get_tensor`` return; the tests compare ``tf_bundle`` with that.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from converter.errors import SourceFormatError
from converter.formats import tf_bundle

ROOT = Path(__file__).resolve().parents[1]

GENERATOR = textwrap.dedent(r"""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import numpy as np, tensorflow as tf, keras

    out = sys.argv[1]
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inp)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    y = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inp, y)
    for w in model.weights:  # random everything, variances positive
        v = rng.standard_normal(w.shape).astype("float32")
        w.assign(np.abs(v) + 0.1 if "variance" in w.path else v)

    prefixes = {}
    prefixes["object"] = tf.train.Checkpoint(model=model).write(os.path.join(out, "object", "ckpt"))
    prefixes["saved"] = tf.train.Checkpoint(model=model).save(os.path.join(out, "saved", "ckpt"))
    model.export(os.path.join(out, "savedmodel"), verbose=False)
    prefixes["savedmodel"] = os.path.join(out, "savedmodel", "variables", "variables")

    named = {
        "conv1/kernel": tf.constant(rng.standard_normal((3, 3, 3, 8)), tf.float32),
        "conv1_bn/gamma": tf.constant(rng.standard_normal(8), tf.float16),
        "conv1_bn/moving_variance": tf.constant(rng.random(8) + 0.1, tf.float64),
        "global_step": tf.constant(123456789012, tf.int64),
        "mask": tf.constant(rng.random((4, 3)) > 0.5),
        "counts": tf.constant(rng.integers(-5, 5, (2, 2)), tf.int32),
        "pixels": tf.constant(rng.integers(0, 255, (6,)), tf.uint8),
        "bf": tf.constant(rng.standard_normal(7), tf.bfloat16),
        "labels": tf.constant([b"cat", b"", b"dog\x00\xff"]),
        "empty": tf.zeros((0, 3)),
        # > 8 KiB: checked by the numpy crc32c lanes
        "head/kernel": tf.constant(rng.standard_normal((300, 200)), tf.float32),
    }
    prefixes["named"] = os.path.join(out, "named", "model")
    tf.raw_ops.SaveV2(prefix=prefixes["named"], tensor_names=list(named),
                      shape_and_slices=[""] * len(named), tensors=list(named.values()))

    # Two shards: two SaveV2 calls merged.
    parts = [os.path.join(out, "tmp", "a"), os.path.join(out, "tmp", "b")]
    tf.raw_ops.SaveV2(prefix=parts[0], tensor_names=["a/w", "a/b"], shape_and_slices=["", ""],
                      tensors=[tf.constant(rng.standard_normal((40, 30)), tf.float32),
                               tf.ones([3])])
    tf.raw_ops.SaveV2(prefix=parts[1], tensor_names=["b/w"], shape_and_slices=[""],
                      tensors=[tf.constant(rng.standard_normal((3, 3, 4, 4)), tf.float32)])
    prefixes["merged"] = os.path.join(out, "merged", "model")
    tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefixes["merged"])

    # TF's own sharding policy: several shards, big variables split into slices.
    vs = [tf.Variable(rng.standard_normal(s).astype("float32"))
          for s in [(64, 64), (128, 40), (7,)]]
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=12_000)
    opts = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    prefixes["sharded"] = tf.train.Checkpoint(v=vs).write(
        os.path.join(out, "sharded", "ckpt"), options=opts)

    # A partitioned (TF1-style) variable written as two slices.
    prefixes["sliced"] = os.path.join(out, "sliced", "model")
    tf.raw_ops.SaveV2(prefix=prefixes["sliced"], tensor_names=["part", "part", "whole"],
                      shape_and_slices=["6 2 0,4:-", "6 2 4,2:-", ""],
                      tensors=[tf.ones([4, 2]) * 2, tf.ones([2, 2]) * 3, tf.ones([2])])

    ref = {}
    arrays = {}
    for label, prefix in prefixes.items():
        reader = tf.train.load_checkpoint(prefix)
        dtypes = reader.get_variable_to_dtype_map()
        rows = []
        for name, shape in tf.train.list_variables(prefix):
            value = reader.get_tensor(name)
            dt = dtypes[name]
            row = {"name": name, "shape": list(shape),
                   "dtype": "string" if dt == tf.string else dt.name}
            if dt == tf.string:
                row["bytes"] = [b.hex() for b in np.asarray(value, dtype=object).ravel()]
            else:
                key = f"{label}:{name}"
                value = np.asarray(value)
                arrays[key] = value.view(np.uint16) if dt == tf.bfloat16 else value
                row["key"] = key
            rows.append(row)
        ref[label] = {"prefix": prefix, "entries": rows}
    np.savez(os.path.join(out, "reference.npz"), **arrays)
    with open(os.path.join(out, "reference.json"), "w") as fh:
        json.dump(ref, fh)
    """)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tf_bundle")
    proc = subprocess.run(
        [sys.executable, "-c", GENERATOR, str(out)], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"checkpoint generation failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    ref = json.loads((out / "reference.json").read_text())
    ref["_arrays"] = dict(np.load(out / "reference.npz"))
    ref["_dir"] = out
    return ref


def _check_against_tf(ckpts: dict, label: str) -> dict[str, tf_bundle.BundleEntry]:
    case = ckpts[label]
    prefix = tf_bundle.resolve_prefix(case["prefix"])
    assert prefix == Path(case["prefix"])
    entries = tf_bundle.read_index(prefix)
    assert sorted(entries) == sorted(r["name"] for r in case["entries"])
    for row in case["entries"]:
        entry = entries[row["name"]]
        assert entry.shape == tuple(row["shape"]), row["name"]
        assert entry.dtype == row["dtype"], row["name"]
        got = tf_bundle.load_tensor(prefix, entry)
        assert got.shape == tuple(row["shape"]), row["name"]
        if row["dtype"] == "string":
            assert [b.hex() for b in got.ravel()] == row["bytes"], row["name"]
            continue
        want = ckpts["_arrays"][row["key"]]
        if row["dtype"] == "bfloat16":
            assert str(got.dtype) == "bfloat16"
            got = got.view(np.uint16)
        assert got.dtype == want.dtype, row["name"]
        assert got.tobytes() == want.tobytes(), row["name"]  # bit-exact
        assert got.flags.writeable
    return entries


def test_keras_object_checkpoint_matches_tensorflow(ckpts):
    entries = _check_against_tf(ckpts, "object")
    assert entries["_CHECKPOINTABLE_OBJECT_GRAPH"].dtype == "string"
    shapes = {e.shape for e in entries.values()}
    assert (
        (3, 3, 3, 8) in shapes and (3, 3, 8, 1) in shapes and (8, 5) in shapes
    )  # conv, depthwise, dense


def test_savedmodel_variables_match_tensorflow(ckpts):
    _check_against_tf(ckpts, "savedmodel")
    sm = Path(ckpts["savedmodel"]["prefix"]).parents[1]
    assert tf_bundle.resolve_prefix(sm) == sm / "variables" / "variables"
    assert tf_bundle.sniff(sm)


def test_name_based_savev2_all_dtypes_match_tensorflow(ckpts):
    entries = _check_against_tf(ckpts, "named")
    dtypes = {n: e.dtype for n, e in entries.items()}
    assert dtypes["conv1_bn/gamma"] == "float16" and dtypes["conv1_bn/moving_variance"] == "float64"
    assert (
        dtypes["global_step"] == "int64" and dtypes["mask"] == "bool" and dtypes["bf"] == "bfloat16"
    )
    assert entries["global_step"].shape == () and entries["empty"].shape == (0, 3)


def test_multi_shard_merged_bundle(ckpts):
    entries = _check_against_tf(ckpts, "merged")
    prefix = Path(ckpts["merged"]["prefix"])
    assert tf_bundle.read_header(prefix).num_shards == 2
    assert {e.shard_id for e in entries.values()} == {0, 1}


def test_sharding_policy_with_sliced_variables(ckpts):
    entries = _check_against_tf(ckpts, "sharded")
    prefix = Path(ckpts["sharded"]["prefix"])
    assert tf_bundle.read_header(prefix).num_shards > 2
    assert any(e.slices for e in entries.values())  # reassembled, and equal to TensorFlow's values


def test_partitioned_variable_is_reassembled(ckpts):
    entries = _check_against_tf(ckpts, "sliced")
    assert len(entries["part"].slices) == 2
    np.testing.assert_array_equal(
        tf_bundle.load_tensor(Path(ckpts["sliced"]["prefix"]), entries["part"])[:, 0],
        [2, 2, 2, 2, 3, 3],
    )


def test_resolve_prefix_accepts_every_spelling(ckpts, tmp_path):
    prefix = Path(ckpts["object"]["prefix"])
    for spelling in (
        prefix,
        str(prefix),
        Path(str(prefix) + ".index"),
        Path(str(prefix) + ".data-00000-of-00001"),
        prefix.parent,
    ):
        assert tf_bundle.resolve_prefix(spelling) == prefix
        assert tf_bundle.sniff(spelling)
    saved = Path(ckpts["saved"]["prefix"])  # ckpt-1, with a `checkpoint` state file
    assert saved.name == "ckpt-1" and (saved.parent / "checkpoint").is_file()
    assert tf_bundle.resolve_prefix(saved.parent) == saved
    _check_against_tf(ckpts, "saved")
    # A copied directory whose state file holds the saving machine's absolute path.
    copy = tmp_path / "moved"
    shutil.copytree(saved.parent, copy)
    (copy / "checkpoint").write_text(f'model_checkpoint_path: "/nowhere/{saved.name}"\n')
    assert tf_bundle.resolve_prefix(copy) == copy / saved.name


def _copy_bundle(prefix: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in prefix.parent.glob(prefix.name + ".*"):
        shutil.copy(f, dest / f.name)
    return dest / prefix.name


def _raises(fn, *needles: str) -> str:
    with pytest.raises(SourceFormatError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_empty_and_truncated_index(ckpts, tmp_path):
    prefix = _copy_bundle(Path(ckpts["named"]["prefix"]), tmp_path)
    index = Path(str(prefix) + ".index")
    data = index.read_bytes()
    index.write_bytes(data[: len(data) // 2])
    _raises(
        lambda: tf_bundle.read_index(prefix),
        str(index),
        "bad footer magic",
        "pass the checkpoint prefix",
    )
    assert not tf_bundle.sniff(prefix)
    index.write_bytes(b"")
    _raises(lambda: tf_bundle.read_index(prefix), str(index), "empty")
    assert not tf_bundle.sniff(index)
    index.write_bytes(b"\0" * 100 + data)  # footer intact, blocks shifted
    _raises(lambda: tf_bundle.read_index(prefix), str(index))


def test_corrupt_index_block_fails_its_checksum(ckpts, tmp_path):
    prefix = _copy_bundle(Path(ckpts["named"]["prefix"]), tmp_path)
    index = Path(str(prefix) + ".index")
    data = bytearray(index.read_bytes())
    data[20] ^= 0x01
    index.write_bytes(bytes(data))
    _raises(lambda: tf_bundle.read_index(prefix), str(index), "checksum")


def test_truncated_data_shard(ckpts, tmp_path):
    prefix = _copy_bundle(Path(ckpts["named"]["prefix"]), tmp_path)
    entries = tf_bundle.read_index(prefix)
    last = max(entries.values(), key=lambda e: e.offset + e.size)
    shard = Path(str(prefix) + ".data-00000-of-00001")
    shard.write_bytes(shard.read_bytes()[: last.offset + last.size // 2])
    _raises(lambda: tf_bundle.load_tensor(prefix, last), str(shard), last.name, "truncated")


@pytest.mark.parametrize("name", ["head/kernel", "conv1/kernel", "labels"])
def test_flipped_byte_fails_checksum(ckpts, tmp_path, name):
    prefix = _copy_bundle(Path(ckpts["named"]["prefix"]), tmp_path)
    entry = tf_bundle.read_index(prefix)[name]
    shard = Path(str(prefix) + ".data-00000-of-00001")
    data = bytearray(shard.read_bytes())
    data[entry.offset + entry.size - 1] ^= 0x40
    shard.write_bytes(bytes(data))
    _raises(
        lambda: tf_bundle.load_tensor(prefix, entry), f"tensor {name} in {shard} fails its checksum"
    )
    tf_bundle.load_tensor(prefix, entry, verify_crc=False)  # sizes only: reads


def test_missing_shard(ckpts, tmp_path):
    prefix = _copy_bundle(Path(ckpts["merged"]["prefix"]), tmp_path)
    missing = Path(str(prefix) + ".data-00001-of-00002")
    missing.unlink()
    entries = tf_bundle.read_index(prefix)
    entry = next(e for e in entries.values() if e.shard_id == 1)
    _raises(
        lambda: tf_bundle.load_tensor(prefix, entry),
        str(missing),
        entry.name,
        "shard 2 of 2",
        ".data-*",
    )
    tf_bundle.load_tensor(prefix, next(e for e in entries.values() if e.shard_id == 0))


def test_paths_without_a_checkpoint(ckpts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(lambda: tf_bundle.resolve_prefix(empty), str(empty), "no TensorFlow checkpoint")
    assert not tf_bundle.sniff(empty)
    _raises(
        lambda: tf_bundle.resolve_prefix(tmp_path / "nope" / "model"), "nope/model.index", "prefix"
    )
    two = tmp_path / "two"
    _copy_bundle(Path(ckpts["named"]["prefix"]), two)
    _copy_bundle(Path(ckpts["object"]["prefix"]), two)
    _raises(lambda: tf_bundle.resolve_prefix(two), str(two), "2 checkpoints", "pass one prefix")
    other = tmp_path / "weights.h5"
    other.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert not tf_bundle.sniff(other)
    broken_sm = tmp_path / "sm"
    broken_sm.mkdir()
    (broken_sm / "saved_model.pb").write_bytes(b"")
    _raises(lambda: tf_bundle.resolve_prefix(broken_sm), str(broken_sm), "variables")


def test_unsupported_dtypes_are_refused_by_name(ckpts, monkeypatch):
    prefix = Path(ckpts["named"]["prefix"])
    entries = tf_bundle.read_index(prefix)
    fake = dataclasses.replace(entries["counts"], dtype="qint8", tf_dtype="DT_QINT8")
    _raises(lambda: tf_bundle.load_tensor(prefix, fake), "counts", "DT_QINT8")
    res = dataclasses.replace(entries["counts"], dtype="string", tf_dtype="DT_RESOURCE")
    _raises(lambda: tf_bundle.load_tensor(prefix, res), "counts", "DT_RESOURCE")
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if not installed
    _raises(lambda: tf_bundle.load_tensor(prefix, entries["bf"]), "bf", "bfloat16", "ml_dtypes")


def test_crc32c_known_values_and_lane_method():
    assert tf_bundle.crc32c(b"123456789") == 0xE3069283
    assert tf_bundle.crc32c(b"") == 0
    rng = np.random.default_rng(1)
    for n in (8191, 8192, 8193, 65536 + 3, 300_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tf_bundle._crc32c_np(data) == tf_bundle._crc32c_py(data), n


def test_reading_does_not_import_tensorflow(ckpts):
    code = textwrap.dedent(f"""
        import sys
        from converter.formats import tf_bundle
        for p in {[ckpts[k]["prefix"] for k in ("object", "sharded", "named")]!r}:
            prefix = tf_bundle.resolve_prefix(p)
            for e in tf_bundle.read_index(prefix).values():
                tf_bundle.load_tensor(prefix, e)
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "google"))
        assert not bad, bad
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
