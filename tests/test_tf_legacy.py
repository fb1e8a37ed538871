"""Legacy TensorFlow sources read without TensorFlow: tf.keras 2.x SavedModels (their Keras metadata:
layer configs, custom layers, a nested model keyed ``variables/<i>``) and TF1 name-based checkpoints.

The sources are built once by fixtures/tf_legacy.py in a subprocess (tf_keras and tf.compat.v1) and
cached like the Keras fixtures; the PyTorch twins are fixtures/tf_legacy_models.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from helpers import CACHE, ROOT, cached_build, rel_err, torch_logits

GENERATOR = ROOT / "fixtures" / "tf_legacy.py"
TWINS = ROOT / "fixtures" / "tf_legacy_models.py"

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def legacy() -> dict:
    if importlib.util.find_spec("tf_keras") is None:  # found, not imported (no TF in this process)
        pytest.skip("tf_keras builds the tf.keras 2.x fixtures (make venv installs it)")
    key = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12]
    return cached_build(CACHE / f"tf_legacy-{key}", GENERATOR, [])


def tfk_table(tmp_path: Path) -> Path:
    """The user's table for the tf.keras fixtures: names -> modules, the custom layer by name."""
    rules = [("c1", "c1", "conv2d", ""), ("bn1", "bn1", "batch_norm", ""),
             ("scale", "scale", "layer_scale", 'args = { param = "gain" }\n'),
             ("ic", "block.0", "conv2d", ""), ("ibn", "block.1", "batch_norm", ""),
             ("fc", "fc", "dense", "")]  # fmt: skip
    text = '[table]\nid = "tfk-custom"\nversion = 1\n[input]\nsize = 16\nrange = [-1.0, 1.0]\n'
    text += f'[[variants]]\ntarget = "{TWINS}:tfk_custom"\n'
    for src, dst, transform, extra in rules:
        text += f"[[rules]]\nsource = '{src}'\ntarget = '{dst}'\ntransform = '{transform}'\n{extra}"
    path = tmp_path / "tfk.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tfk_custom", "tfk_noconfig", "tfk_v24"])
def test_tf_keras_savedmodel_config_and_conversion(legacy, name, tmp_path, cli):
    """The layer configs come from the SavedModel's Keras metadata (no TensorFlow here): BN momentum
    and eps per layer, the custom layer by its class, the nested block's ``variables/<i>`` keys
    through the object graph; converted onto the user's module, the logits match tf.keras'."""
    import converter

    src = Path(legacy["dir"]) / name
    rc, out, err = cli("inspect", src, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["config_origin"] == "file"
    layers = {lay["name"]: lay for lay in info["layers"]}
    assert layers["scale"]["class"] == "Scale" and list(layers["scale"]["vars"]) == ["gain"]
    assert layers["bn1"]["bn"]["momentum"] == 0.9 and layers["bn1"]["bn"]["epsilon"] == 1e-4
    assert layers["ic"]["vars"]["kernel"]["key"].startswith("variables/")
    assert layers["ibn"]["bn"]["momentum"] == 0.99
    result = converter.convert(src, mapping=tfk_table(tmp_path))
    origin = "saved_model.pb" if name == "tfk_v24" else "keras_metadata.pb"
    assert any(f"model config read from {origin}" in n for n in result.notes)
    assert result.bn_config["bn1"]["momentum"] == pytest.approx(0.1)
    assert result.bn_config["bn1"]["eps"] == pytest.approx(1e-4)
    assert result.bn_config["block.1"]["momentum"] == pytest.approx(0.01)
    dst = result.save(tmp_path / "out.safetensors")
    model = converter.load_model(dst)
    assert model.bn1.momentum == pytest.approx(0.1) and model.bn1.eps == pytest.approx(1e-4)
    ref = np.load(Path(legacy["dir"]) / "reference.npz")[name]
    assert rel_err(torch_logits(model, legacy["x"]), ref) < 1e-5


def nested_table(tmp_path: Path) -> Path:
    text = '[table]\nid = "tfk-nested"\nversion = 1\n[input]\nsize = 16\nrange = [-1.0, 1.0]\n'
    text += f'[[variants]]\ntarget = "{TWINS}:tfk_nested"\n'
    for src, dst, transform in (("conv", "backbone.0", "conv2d"), ("bn", "backbone.1", "batch_norm"),
                                ("head", "head", "dense")):  # fmt: skip
        text += f"[[rules]]\nsource = '{src}'\ntarget = '{dst}'\ntransform = '{transform}'\n"
    path = tmp_path / "nested.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tfk_nested", "keras21.h5"])
def test_tf_keras_nested_model(legacy, name, tmp_path):
    """A Functional backbone as one layer of the user's model, in a tf.keras SavedModel and in a
    Keras 2.1-style HDF5 file (class ``Model``, old layer schema): its variables resolve through
    the nested layer, the nesting is reported, and Keras 3 can rebuild the config (Keras 2 numbers
    the nested model's first call node 1)."""
    import converter
    from converter.formats import read
    from converter.keras_config import shift_nested_model_nodes

    src = Path(legacy["dir"]) / name
    result = converter.convert(src, mapping=nested_table(tmp_path))
    assert result.nesting["layer"] == "backbone"
    assert result.bn_config["backbone.1"]["momentum"] == pytest.approx(0.03)
    model = converter.load_model(result.save(tmp_path / "out.safetensors"))
    ref = np.load(Path(legacy["dir"]) / "reference.npz")[name]
    assert rel_err(torch_logits(model, legacy["x"]), ref) < 1e-5
    config = read(src).model_config
    pool = next(e for e in config["config"]["layers"] if e["name"] == "pool")
    assert pool["inbound_nodes"] == [[["backbone", 1, 0, {}]]]
    shift_nested_model_nodes(config)
    assert pool["inbound_nodes"] == [[["backbone", 0, 0, {}]]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tfk_nested", "keras21.h5"])
def test_tf_keras_nested_model_verifies(legacy, name, tmp_path, cli):
    """Layer by layer against Keras 3 rebuilding the Keras 2 config (one Keras process each)."""
    src, out = Path(legacy["dir"]) / name, tmp_path / "o.safetensors"
    rc, stdout, err = cli("convert", src, "--mapping", nested_table(tmp_path), "-o", out,
                          "--verify", "--json")  # fmt: skip
    assert rc == 0, err
    report = json.loads(stdout)["verification"]
    assert report["passed"] and len(report["layers"]) >= 2


def tf1_table(tmp_path: Path) -> Path:
    text = '[table]\nid = "tf1-net"\nversion = 1\n[input]\nsize = 16\nrange = [-1.0, 1.0]\n'
    text += f'[[variants]]\ntarget = "{TWINS}:tf1_net"\n'
    for name, transform in (("conv1", "conv2d"), ("bn1", "batch_norm"), ("conv2", "conv2d"),
                            ("bn2", "batch_norm"), ("fc", "dense")):  # fmt: skip
        text += f"[[rules]]\nsource = '{name}'\ntarget = '{name}'\ntransform = '{transform}'\n"
    path = tmp_path / "tf1.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "src, ema", [("tf1", False), ("tf1/model.ckpt-5.meta", True), ("tf1/model.ckpt-5.index", False)]
)
def test_tf1_checkpoint_slots_ema_and_meta_momentum(legacy, src, ema, tmp_path):
    """A TF1 Saver checkpoint: the state file names another machine's path, Adam slots and
    global_step are dropped and counted, BN momentum/eps come from the .meta graph, --use-ema
    takes the shadows; the logits match TensorFlow's."""
    import converter

    result = converter.convert(Path(legacy["dir"]) / src, mapping=tf1_table(tmp_path), use_ema=ema)
    notes = " | ".join(result.notes)
    assert "18 Adam slots, beta1_power, beta2_power, global_step" in notes
    assert ("another machine's path" in notes) == (src == "tf1")
    assert result.bn_config["bn1"]["momentum"] == pytest.approx(0.05)
    assert result.bn_config["bn1"]["eps"] == pytest.approx(2e-3)
    assert result.bn_config["bn2"]["momentum"] == pytest.approx(0.1)
    model = converter.load_model(result.save(tmp_path / "out.safetensors"))
    ref = np.load(Path(legacy["dir"]) / "reference.npz")["tf1_ema" if ema else "tf1"]
    assert rel_err(torch_logits(model, legacy["x"]), ref) < 1e-5


def test_tf1_without_meta_refuses_until_momentum_given(legacy, tmp_path, cli):
    """Empty-prefix files and no .meta: BN momentum is nowhere, so convert refuses (never PyTorch's
    0.1 silently) until --source-bn-momentum gives it."""
    from helpers import assert_clean_error

    src, table = Path(legacy["dir"]) / "tf1_bare", tf1_table(tmp_path)
    out = tmp_path / "o.safetensors"
    rc, _, err = cli("convert", src, "--mapping", table, "-o", out)
    assert_clean_error(rc, err, "bn1", "--source-bn-momentum", out=out)
    rc, _, err = cli("convert", src, "--mapping", table, "-o", out, "--source-bn-momentum", "0.95")
    assert rc == 0, err
    rc, stdout, err = cli("inspect", out, "--json")
    bn = json.loads(stdout)["bn_config"]
    assert bn["bn1"]["momentum"] == pytest.approx(0.05) and bn["bn2"]["keras_momentum"] == 0.95


def test_table_mistakes_are_named(legacy, tmp_path, cli):
    """What a user's table gets wrong is said: a rule another rule shadows (both named), a rule
    whose transform does not read the layer's variables, and why no table fits."""
    from helpers import assert_clean_error

    src, text = Path(legacy["dir"]) / "tf1", tf1_table(tmp_path).read_text()
    out = tmp_path / "o.safetensors"
    cases = {
        "shadow": (text.replace("source = 'conv1'", "source = 'conv.'"),
                   ["rule conv2 -> conv2", "rule conv. -> conv1", "never applies"]),
        "reads": (text.replace("target = 'bn1'\ntransform = 'batch_norm'",
                               "target = 'bn1'\ntransform = 'layer_norm'"),
                  ["bn1/moving_mean (rule bn1 -> bn1 [layer_norm] matched", "reads gamma, beta"]),
        "fits": (text.replace("[[rules]]\nsource = 'fc'\ntarget = 'fc'\ntransform = 'dense'\n", ""),
                 ["no mapping table fits", "closest: table tf1-net", "4 of 5", "no rule for fc"]),
    }  # fmt: skip
    for name, (table, needles) in cases.items():
        (tmp_path / f"{name}.toml").write_text(table)
        rc, _, err = cli("convert", src, "--mapping", tmp_path / f"{name}.toml", "-o", out)
        assert_clean_error(rc, err, *needles, out=out)


def test_inspect_graph_and_no_truncation(legacy, cli, monkeypatch):
    """``inspect --graph`` lists every layer with its settings and inputs; on a narrow terminal no
    layer or class name is cut (rich would end it with an ellipsis)."""
    src = Path(legacy["dir"]) / "tfk_custom"
    rc, out, err = cli("inspect", src, "--graph", "--json")
    graph = {(g["scope"], g["name"]): g for g in json.loads(out)["graph"]}
    (first,) = [name for (_, name), g in graph.items() if g["class"] == "InputLayer"]
    assert graph[("", "c1")]["inputs"] == [first]
    assert graph[("", "c1")]["config"]["strides"] == [2, 2]
    assert graph[("", "c1")]["config"]["padding"] == "same"
    assert graph[("block", "ibn")]["inputs"] == ["ic"] and graph[("", "fc")]["class"] == "Dense"
    assert graph[("", "scale")]["class"] == "Scale"
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "60")
    rc, _, err = cli("inspect", src, "--graph")
    assert rc == 0 and "…" not in err
    for name in ("global_average_pooling2d", "GlobalAveragePooling2D", "BatchNormalization"):
        assert name in err
    rc, _, err = cli("inspect", src)
    assert rc == 0 and "…" not in err and "BatchNormalization" in err and "block/ibn" in err


@pytest.mark.parametrize("name", ["tf1_cond_v1", "tf1_cond_v2"])
def test_tf1_meta_momentum_inside_tf_cond(legacy, name, tmp_path):
    """BN layers trained with a ``training`` placeholder keep momentum in a ``tf.cond``: read from
    TF1's Switch/Merge consts and from TF2's If branch functions alike."""
    import converter

    result = converter.convert(Path(legacy["dir"]) / name, mapping=tf1_table(tmp_path))
    assert result.bn_config["bn1"]["momentum"] == pytest.approx(0.05)
    assert result.bn_config["bn1"]["eps"] == pytest.approx(2e-3)
    assert result.bn_config["bn2"]["momentum"] == pytest.approx(0.1)
    assert result.bn_config["bn2"]["eps"] == pytest.approx(1e-3)
    assert not any("not recorded" in n or "not in the checkpoint" in n for n in result.notes)


def test_tf1_layer_list_from_graph(legacy, cli):
    """Config-less TF1 checkpoints: layers in the graph's creation order with conv strides/padding
    from the .meta graph; TF-slim's names (weights/biases, BatchNorm without gamma, decay 0.997,
    Momentum slots) read as Keras' (kernel/bias)."""
    rc, out, err = cli("inspect", Path(legacy["dir"]) / "tf1", "--graph", "--json")
    graph = json.loads(out)["graph"]
    assert [g["name"] for g in graph] == ["conv1", "bn1", "conv2", "bn2", "fc"]
    assert graph[2]["config"]["strides"] == [2, 2] and graph[2]["config"]["padding"] == "valid"
    rc, out, err = cli("inspect", Path(legacy["dir"]) / "slim", "--json")
    info = json.loads(out)
    layers = {lay["name"].rsplit("/", 1)[-1]: lay for lay in info["layers"]}
    assert list(layers) == ["conv1", "BatchNorm", "logits"]
    assert sorted(layers["logits"]["vars"]) == ["bias", "kernel"]
    assert layers["BatchNorm"]["bn"] == {
        "momentum": 0.997, "epsilon": 1.001e-5, "center": True, "scale": False, "axis": -1
    }  # fmt: skip
    assert any("4 Momentum slots, global_step" in n for n in info["notes"])


def test_tf1_damaged_meta_is_said_and_weights_still_read(legacy, tmp_path, cli):
    """A damaged .meta next to the bundle: said in a note, the weights still read, and the BN
    momentum it held is then unknown (convert refuses until it is given)."""
    import shutil

    from helpers import assert_clean_error

    src = tmp_path / "ckpt"
    shutil.copytree(Path(legacy["dir"]) / "tf1", src)
    (src / "model.ckpt-5.meta").write_bytes(b"\x0a\xff\xff\xff\x0f" + b"\x00" * 64)
    rc, out, err = cli("inspect", src, "--json")
    info = json.loads(out)
    assert rc == 0 and any("is not a readable MetaGraphDef" in n for n in info["notes"])
    assert {lay["name"] for lay in info["layers"]} == {"conv1", "bn1", "conv2", "bn2", "fc"}
    dst = tmp_path / "o.safetensors"
    rc, _, err = cli("convert", src, "--mapping", tf1_table(tmp_path), "-o", dst)
    assert_clean_error(rc, err, "bn1", "--source-bn-momentum", out=dst)


# (source, twin, reference logits, --use-ema, {module: (torch momentum, eps)}): every BN module
DRAFTED = {
    "tfk_custom": ("user_custom", "tfk_custom", False,
                   {"norm": (0.1, 1e-4), "proj.1": (0.01, 1e-3)}),
    "tfk_v24": ("user_custom", "tfk_v24", False, {"norm": (0.1, 1e-4), "proj.1": (0.01, 1e-3)}),
    "tf1": ("user_tf1", "tf1", False, {"norms.0": (0.05, 2e-3), "norms.1": (0.1, 1e-3)}),
    "tf1/model.ckpt-5.meta": ("user_tf1", "tf1_ema", True,
                              {"norms.0": (0.05, 2e-3), "norms.1": (0.1, 1e-3)}),
    "keras21.h5": ("user_nested", "keras21.h5", False, {"bn": (0.03, 1e-5)}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(DRAFTED))
def test_drafted_mapping_without_table(legacy, name, tmp_path, cli):
    """``convert SRC --to model.py:factory`` with no table, for a tf.keras SavedModel with a custom
    layer (its parameter named like the Keras variable), a TF1 checkpoint with Adam slots, EMA
    shadows and a .meta graph (layers chained in creation order: no connections stored), and a
    Keras 2.1 HDF5 file, each onto a module written the user's way (own names, registered in
    another order, BN at PyTorch's defaults): the logits match the source's recorded ones, and
    every BN module carries 1 - m and the source's eps."""
    import torch

    import converter

    twin, ref_key, ema, bns = DRAFTED[name]
    out = tmp_path / "o.safetensors"
    chain = name.startswith("tf1")  # no Keras config: nothing to run, and convert says so
    args = (["--use-ema"] if ema else []) + ([] if chain else ["--no-verify"])
    rc, stdout, err = cli("convert", Path(legacy["dir"]) / name, "--to", f"{TWINS}:{twin}",
                          "-o", out, "--json", *args)  # fmt: skip
    assert rc == 0, err
    skipped = json.loads(stdout).get("verification_skipped", "")
    assert ("no Keras model config to run" in skipped) == chain
    assert chain == (
        "drafted as a chain in creation order" in (tmp_path / "o.mapping.toml").read_text()
    )
    model = converter.load_model(out)
    found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert found.keys() == bns.keys()
    for module, (momentum, eps) in bns.items():
        assert (found[module].momentum, found[module].eps) == pytest.approx((momentum, eps))
    ref = np.load(Path(legacy["dir"]) / "reference.npz")[ref_key]
    assert rel_err(torch_logits(model, legacy["x"]), ref) < 1e-5


def test_drafting_without_connections_chains_in_creation_order(legacy):
    """A config without connections (what a model whose custom layer lacks get_config may store)
    drafts its weighted layers as a chain in creation order: the same rules as the connected
    config on this chain-shaped model, and the table says how it was drafted."""
    from converter.drafting import draft_for_source
    from converter.source import resolve_source

    src, spec = Path(legacy["dir"]) / "tfk_custom", f"{TWINS}:user_custom"
    connected = draft_for_source(resolve_source(src), spec)
    source = resolve_source(src)
    cfg = source.raw.model_config["config"]
    for key in ("input_layers", "output_layers"):
        del cfg[key]
    for entry in cfg["layers"]:
        entry.pop("inbound_nodes", None)
    chained = draft_for_source(source, spec)
    assert chained.rows() == connected.rows() and len(chained.rows()) == 6
    assert "drafted as a chain" in chained.text and "drafted as a chain" not in connected.text


def test_custom_layer_needs_parameters_named_like_its_variables(legacy, tmp_path, cli):
    """A custom layer pairs only with a module whose parameters carry its variables' names (and
    sizes up to size-1 axes); otherwise the refusal names the layer, its variables and the fix."""
    from helpers import assert_clean_error

    twins = tmp_path / "twins.py"
    twins.write_text(TWINS.read_text().replace("self.gain", "self.g"))
    out = tmp_path / "o.safetensors"
    rc, _, err = cli("convert", Path(legacy["dir"]) / "tfk_custom", "--to",
                     f"{twins}:user_custom", "-o", out)  # fmt: skip
    assert_clean_error(rc, err, "'scale' (Scale: gain (4,))", "named like its variables", out=out)


def test_to_shape_reshapes_across_size_one_axes_only():
    from converter.transforms import TRANSFORMS, ToShape

    x = np.arange(4, dtype=np.float32)
    t = ToShape((4, 1, 1), (4,))
    assert t(x).shape == (4, 1, 1) and t(x)[2, 0, 0] == 2.0
    np.testing.assert_array_equal(t.inverse(t(x)), x)
    with pytest.raises(ValueError):
        ToShape((3, 2), (2, 3)).shape((2, 3))  # a transposed matrix is not a reshape
    same = TRANSFORMS.get("same_names")
    assert same.draft_args({"tensors": {"gain": (4, 1, 1)}}) == {"gain": [4, 1, 1]}
    assert same.draft_args({"tensors": {"0.weight": (4,)}}) is None  # not a TOML bare key
