"""Tables, transforms and registries: static checks that need neither TensorFlow nor PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from converter.errors import MappingError, RegistryError
from converter.manifest import load_manifest
from converter.pipeline import dry_run, target_manifest_for
from converter.registry import Registry
from converter.surgeries import SURGERIES
from converter.tables import builtin_tables, load_table
from converter.transforms import (CONV_HWIO_TO_OIHW, DENSE_IN_OUT_TO_OUT_IN, TRANSFORMS,
                                  Conv1x1ToLinear, DepthwiseToTorch, FlattenNHWCToNCHW)

VARIANTS = [(t, v) for t in builtin_tables() for v in t.variants]
# Variants whose target_kwargs differ from the shipped target manifest build the target model:
# ConvNeXt Small..XLarge include_top=False take 10-45 s each on 2 cores (Tiny: ~10 s, not slow)
_BIG = ("Small", "Base", "Large", "XLarge")
SLOW = {f"keras:ConvNeXt{v}(include_top=False)" for v in _BIG}
DRY_RUNS = [
    pytest.param(t, v, id=f"{v.source}->{v.target}", marks=[pytest.mark.slow] * (v.source in SLOW))
    for t, v in VARIANTS
]


@pytest.mark.parametrize("table,variant", DRY_RUNS)
def test_every_variant_maps_every_tensor(table, variant):
    """Source manifest -> target manifest through the table: every source tensor mapped or dropped,
    every target tensor filled, shapes right, every BN module configured."""
    result = dry_run(table, variant)
    target = load_manifest(variant.target)
    if target["kwargs"] != variant.target_kwargs:  # another width of the target (width_mult=1.3):
        # the shipped manifest's kwargs are still the variant's, which adds its own; built here
        assert target["kwargs"].items() <= variant.target_kwargs.items(), "stale target manifest"
        target = target_manifest_for(variant, dict(variant.target_kwargs))
    assert list(result.state_dict) == [t["key"] for t in target["tensors"]]
    assert set(result.bn_config) == set(target["bn_modules"])
    source_bn = {lay["name"]: lay["config"] for lay in load_manifest(variant.source)["layers"]
                 if lay["class_name"] == "BatchNormalization"}
    for mod, cfg in result.bn_config.items():
        assert cfg["momentum"] == pytest.approx(1 - source_bn[cfg["source_layer"]]["momentum"])
        assert cfg["eps"] == source_bn[cfg["source_layer"]]["epsilon"]
    assert result.taps, "verification needs taps"


def test_bn_values_seen_in_keras():
    """The facts the tables rely on, read from the shipped Keras manifests."""
    def bn(mid):
        return {(c["config"]["momentum"], c["config"]["epsilon"]) for c in load_manifest(mid)["layers"]
                if c["class_name"] == "BatchNormalization"}

    assert bn("keras:EfficientNetB0") == {(0.99, 0.001)}
    assert bn("keras:MobileNetV3Small") == {(0.999, 0.001)}
    assert bn("keras:ResNet50") == {(0.99, 1.001e-05)}
    assert bn("keras:DenseNet121") == {(0.99, 1.001e-05)}
    assert bn("keras:VGG16") == set()


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_layer_transforms_invert(name):
    rng = np.random.default_rng(0)
    t = TRANSFORMS.get(name)
    for var, (param, tt) in t.params.items():
        shape = {
            "kernel": (
                (1, 1, 4, 6)
                if "1x1" in name
                else ((12, 6) if "dense" in name else (3, 3, 4, 1 if "depthwise" in name else 6))
            ),
            "depthwise_kernel": (3, 3, 4, 1),
            "pointwise_kernel": (1, 1, 4, 6),
        }.get(var, (6,))
        shape = getattr(t, "example", {}).get("shapes", {}).get(var, shape)  # layer_kinds.py
        x = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(tt.inverse(tt(x)), x)
        assert repr(tt)


def test_tensor_transform_semantics():
    k = np.arange(3 * 3 * 4 * 6, dtype=np.float32).reshape(3, 3, 4, 6)
    assert CONV_HWIO_TO_OIHW(k)[5, 2, 1, 0] == k[1, 0, 2, 5]
    d = np.arange(3 * 3 * 4 * 2, dtype=np.float32).reshape(3, 3, 4, 2)
    assert DepthwiseToTorch()(d).shape == (8, 1, 3, 3) and DepthwiseToTorch()(d)[2 * 2 + 1, 0, 0, 2] == d[0, 2, 2, 1]
    assert DENSE_IN_OUT_TO_OUT_IN(np.ones((4, 6))).shape == (6, 4)
    assert Conv1x1ToLinear()(np.ones((1, 1, 4, 6))).shape == (6, 4)
    # flatten: Keras row (h, w, c) -> torch column c*H*W + h*W + w
    h, w, c = 2, 3, 4
    kern = np.arange(h * w * c * 5, dtype=np.float32).reshape(h * w * c, 5)
    out = FlattenNHWCToNCHW((h, w, c))(kern)
    for (hh, ww, cc) in [(0, 0, 0), (1, 2, 3), (0, 1, 2)]:
        np.testing.assert_array_equal(out[:, cc * h * w + hh * w + ww], kern[(hh * w + ww) * c + cc])


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (3, 3, 3, 64), (1, 1, 200, 300), (3, 3, 33, 129), (5, 2, 257, 31), (7, 7, 3, 65)],
)
def test_tiled_transposes_equal_numpy(shape):
    """The tiled HWIO -> OIHW and (in, out) -> (out, in) copies equal numpy's transpose, kernel
    sizes that are no multiple of the tile included, and are contiguous."""
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    got = CONV_HWIO_TO_OIHW(x)
    np.testing.assert_array_equal(got, np.transpose(x, (3, 2, 0, 1)))
    assert got.flags.c_contiguous
    m = x.reshape(-1, shape[-1])
    np.testing.assert_array_equal(DENSE_IN_OUT_TO_OUT_IN(m), m.T)
    assert DENSE_IN_OUT_TO_OUT_IN(m).flags.c_contiguous


def test_registry_duplicate_and_miss_list_valid_names():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="registered twice"):
        reg.add("a", 2)
    with pytest.raises(RegistryError, match="unknown thing 'b'; valid: a"):
        reg.get("b")
    with pytest.raises(RegistryError, match="valid: .*conv2d"):
        TRANSFORMS.get("conv3d_magic")
    with pytest.raises(RegistryError, match="resnet_v1_stride_on_1x1"):
        SURGERIES.get("nope")


BASE = """
[table]
id = "t"
version = 1
[[variants]]
target = "timm:resnet50"
"""


@pytest.mark.parametrize("rules,needle", [
    ("[[rules]]\nsource = 'conv(('\ntarget = 'x'\ntransform = 'conv2d'\n", "bad pattern"),
    ("[[rules]]\nsource = 'conv'\ntarget = 'x'\ntransform = 'conv9d'\n", "unknown transform 'conv9d'; valid:"),
    ("[[rules]]\nsource = 'a'\ntarget = 'x'\ntransform = 'conv2d'\n[[rules]]\nsource = 'b'\ntarget = 'x'\ntransform = 'dense'\n", "duplicate target 'x'"),
    ("[[rules]]\nsource = 'a(?P<i>\\\\d)'\ntarget = 'x.{j}'\ntransform = 'conv2d'\n", "group 'j', not in the pattern"),
    ("[[rules]]\nsource = 'a(?P<i>\\\\d)'\ntarget = 'x.{i@blocks}'\ntransform = 'conv2d'\n", "lookup 'blocks' is missing"),
    ("[[drops]]\nsource = 'a'\nas = 'vanish'\n", "as='vanish'"),
    ("[[rules]]\nsource = 'a'\ntarget = 'x'\ntransform = 'conv2d'\ntapp = false\n", "unknown keys"),
])
def test_bad_tables_fail_at_load(tmp_path, rules, needle):
    p = tmp_path / "t.toml"
    p.write_text(BASE + rules)
    with pytest.raises(MappingError, match="mapping table .*t.toml") as exc:
        load_table(p)
    assert needle in str(exc.value)


def test_bad_surgery_and_toml(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text(BASE.replace('target = "timm:resnet50"', 'target = "timm:resnet50"\nsurgeries = [{ name = "nope" }]'))
    with pytest.raises(MappingError, match="unknown surgery 'nope'"):
        load_table(p)
    p.write_text("[table\n")
    with pytest.raises(MappingError, match="not valid TOML"):
        load_table(p)


def _variant(table_id: str):
    return next(v for t in builtin_tables() if t.id == table_id for v in t.variants)


def _pools(manifest_id: str, cls: str) -> list[dict]:
    return [
        lay["config"] for lay in load_manifest(manifest_id)["layers"] if lay["class_name"] == cls
    ]


def test_xception_max_pool_surgery_covers_every_same_pool():
    """Every Keras Xception MaxPooling2D is 3x3/2 'same' (TF padding); the surgery lists exactly one
    timm pool per strided block, the last module of that block's rep (blocks with a skip conv)."""
    pools = _pools("keras:Xception", "MaxPooling2D")
    assert [(p["pool_size"], p["strides"], p["padding"]) for p in pools] == [
        ([3, 3], [2, 2], "same")
    ] * 4
    (surgery,) = _variant("keras-xception").surgeries
    modules = surgery["args"]["modules"]
    keys = {t["key"] for t in load_manifest("timm:legacy_xception")["tensors"]}
    assert len(modules) == len(pools)
    for m in modules:
        block, _, idx = m.partition(".rep.")
        assert f"{block}.skip.weight" in keys
        assert not any(
            k.startswith(f"{block}.rep.{int(idx)}.") for k in keys
        )  # no weights: the pool
        assert any(
            k.startswith(f"{block}.rep.{int(idx) - 1}.running_mean") for k in keys
        )  # after a BN


def test_inception_avg_pool_surgery_matches_keras_same_pools():
    """Keras InceptionV3 mixed blocks pool 3x3/1 'same' (average) or 3x3/2 'valid' (max, the
    reduction blocks mixed3/mixed8); the surgery rescales the branch_pool of exactly the
    torchvision blocks whose Keras twin averages with 'same' padding, in block order."""
    keras_layers = load_manifest("keras:InceptionV3")["layers"]
    kinds = [
        (lay["class_name"], lay["config"]["padding"])
        for lay in keras_layers
        if lay["class_name"] in ("AveragePooling2D", "MaxPooling2D")
    ][
        2:
    ]  # the stem's two max pools
    assert all(p["pool_size"] == [3, 3] for p in _pools("keras:InceptionV3", "AveragePooling2D"))
    blocks = []
    for t in load_manifest("torchvision:inception_v3")["tensors"]:
        b = t["key"].split(".")[0]
        if b.startswith("Mixed_") and b not in blocks:
            blocks.append(b)
    assert len(blocks) == len(kinds) == 11
    same_avg = [
        f"{b}.branch_pool" for b, k in zip(blocks, kinds) if k == ("AveragePooling2D", "same")
    ]
    assert [b for b, k in zip(blocks, kinds) if k == ("MaxPooling2D", "valid")] == [
        "Mixed_6a",
        "Mixed_7a",
    ]
    (surgery,) = _variant("keras-inception-v3").surgeries
    assert surgery["name"] == "avg_pool_exclude_padding"
    assert surgery["args"]["consumers"] == same_avg and len(same_avg) == 9
