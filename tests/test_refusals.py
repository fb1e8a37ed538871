"""Recognised but refused sources (mappings/refusals.toml): every format of a refused Keras
application is identified by structure and `convert` fails with the refusal's one line (exit 2);
`inspect` says so; a malformed refusals file fails at load naming the entry and the fix."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import assert_clean_error, make_keras_fixture, run_cli

from converter.errors import MappingError
from converter.refusals import builtin_refusals, load_refusals, refusal_for, unique_refusals
from converter.tables import builtin_tables

FORMATS = ["keras", "weights.h5"]  # one with a model config, one without (matched by structure)
INPUT = {"size": 32, "range": [0.0, 255.0]}  # weight shapes do not depend on the input size
SLOW = {"keras:NASNetLarge", "keras:MobileNet(alpha=0.5)", "keras:MobileNet(alpha=0.75)"}
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))


def _fixture(manifest_id: str) -> dict:
    from converter.manifest import load_manifest

    build = load_manifest(manifest_id)["build"]
    skip = ("weights", "input_shape", "classifier_activation", "include_top", "classes")
    kwargs = {k: v for k, v in build["kwargs"].items() if k not in skip}  # alpha=0.5 ...
    return make_keras_fixture(build["fn"], kwargs, INPUT, FORMATS)


def _first_of_each_refusal() -> list[str]:
    """A real file for the first source of each refusal entry (ResNet101V2/152V2 and the other
    MobileNet alphas are recognised by the same structural match; tests/test_manifests_keras.py
    checks their manifests against Keras): CI runs every test on 2 cores within 20 minutes."""
    firsts = {refusal.sources[0] for refusal in unique_refusals()}
    return [m for m in builtin_refusals() if m in firsts]


@pytest.mark.parametrize(
    "manifest_id",
    [
        pytest.param(m, marks=[pytest.mark.slow] if m in SLOW else [])
        for m in _first_of_each_refusal()
    ],
)
def test_refused_source_is_recognised_and_refused(manifest_id, tmp_path, capsys):
    refusal = refusal_for(manifest_id)
    fx = _fixture(manifest_id)
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        rc, _, err = run_cli(["convert", fx["files"][fmt], "-o", out], capsys)
        assert_clean_error(rc, err, f"({manifest_id})", refusal.reason, refusal.closest, out=out)
        rc, _, err = run_cli(["inspect", fx["files"][fmt]], capsys)
        assert rc == 0, err
        assert f"recognised: {manifest_id} (refused: {refusal.reason})" in " ".join(err.split())


def test_refusals_name_no_tabled_source_and_reach_the_readme():
    tabled = {v.source for t in builtin_tables() for v in t.variants}
    assert not tabled & set(builtin_refusals()), "a source is both tabled and refused"
    import gen_support_matrix

    section = gen_support_matrix.render()
    for refusal in unique_refusals():
        assert refusal.reason in section


GOOD = """version = 1
[[refusals]]
sources = ["keras:ResNet50V2"]
reason = "r"
closest = "timm:resnetv2_50"
differs = "d"
remedy = "m"
"""


@pytest.mark.parametrize(
    "text,needles",
    [
        ("version = 1\n[[refusals", ["not valid TOML"]),
        ("[[refusals]]\nsources = []", ["version = 1"]),
        (GOOD.replace('remedy = "m"\n', ""), ["refusals[0]", "missing ['remedy']"]),
        (GOOD + 'why = "x"\n', ["refusals[0]", "unknown ['why']"]),
        (GOOD.replace('reason = "r"', 'reason = """two\nlines"""'), ["reason must be one"]),
        (GOOD.replace('["keras:ResNet50V2"]', "[]"), ["sources must be a non-empty list"]),
        (GOOD.replace("ResNet50V2", "ResNet18V2"), ["keras:ResNet18V2", "gen_manifests.py"]),
        (GOOD + GOOD.replace("version = 1\n", ""), ["refusals[1]", "'keras:ResNet50V2'", "twice"]),
    ],
    ids=["toml", "version", "missing", "unknown", "multiline", "no-sources", "no-manifest", "dup"],
)
def test_refusals_file_validation(text, needles, tmp_path):
    path = tmp_path / "refusals.toml"
    path.write_text(text)
    with pytest.raises(MappingError) as exc:
        load_refusals(path)
    for needle in [str(path), *needles]:
        assert needle in str(exc.value)


def test_good_refusals_file_loads(tmp_path):
    path = tmp_path / "refusals.toml"
    path.write_text(GOOD)
    refusals = load_refusals(path)
    assert list(refusals) == ["keras:ResNet50V2"]
    assert refusals.get("keras:ResNet50V2").closest == "timm:resnetv2_50"


def test_a_users_table_takes_precedence_over_the_refusal(tmp_path, capsys):
    """The refusal is what convert says when no table fits; a --mapping table for the refused
    source is used instead (here one that maps nothing, so mapping fails later, differently)."""
    fx = _fixture("keras:ResNet50V2")
    table = tmp_path / "mine.toml"
    table.write_text(
        '[table]\nid = "mine"\nversion = 1\n[[variants]]\nsource = "keras:ResNet50V2"\n'
        'target = "timm:resnetv2_50"\n'
    )
    for fmt in FORMATS:
        out = tmp_path / f"{fmt}.safetensors"
        rc, _, err = run_cli(["convert", fx["files"][fmt], "--mapping", table, "-o", out], capsys)
        assert_clean_error(rc, err, "conv1_conv", out=out)
        assert "no exact PyTorch twin" not in err
