"""Drafted mappings (converter/drafting): tiny custom Keras models (fixtures/keras_draft.py, built
in one cached subprocess) onto PyTorch twins written the way users write them
(fixtures/draft_models.py: BN at PyTorch defaults, shortcut registered first, BNs out of order),
from .keras, legacy .h5 and .weights.h5; a shipped architecture drafted onto timm reproduces its
hand-written table; an ambiguous block is refused with its candidates."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import (
    CACHE,
    GENERATOR,
    ROOT,
    assert_clean_error,
    cached_build,
    keras_build_args,
    make_keras_fixture,
    rel_err,
    torch_logits,
)

DRAFT_GENERATOR = ROOT / "fixtures" / "keras_draft.py"
TWINS = ROOT / "fixtures" / "draft_models.py"

# what each source layer must become (checked besides the outputs: a wrong pairing of two
# same-shaped modules could still be caught only numerically)
EXPECTED = {
    "resblock": {
        "stem": "stem.0",
        "stem_bn": "stem.1",
        "conv_a": "conv_a",
        "bn_a": "bn_a",
        "conv_b": "conv_b",
        "bn_b": "bn_b",
        "conv_s": "shortcut.0",
        "bn_s": "shortcut.1",
        "conv_c": "down",
        "bn_c": "bn_c",
        "head": "fc",
    },
    "flat": {
        "conv1": "conv",
        "bn1": "norms.1",
        "dw": "depthwise",
        "bn2": "norms.0",
        "fc1": "classifier.0",
        "fc2": "classifier.3",
    },
}


@pytest.fixture(scope="module")
def fx() -> dict:
    version = hashlib.sha256(DRAFT_GENERATOR.read_bytes() + GENERATOR.read_bytes()).hexdigest()
    info = cached_build(CACHE / f"keras-draft-{version[:12]}", DRAFT_GENERATOR, [])
    info["ref"] = dict(np.load(info["dir"] / "reference.npz"))
    return info


def target(name: str) -> str:
    return f"{TWINS}:{name}"


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_drafted_mapping_matches_outputs(fx, name, fmt, tmp_path):
    from converter import convert, load_model

    result = convert(fx["files"][name][fmt], target(name))
    assert result.drafted is not None and result.table_id == "drafted"
    assert {m.source_layer: m.target_module for m in result.layers} == EXPECTED[name]
    model = load_model(result.save(tmp_path / "out.safetensors"))
    y = torch_logits(model, fx["ref"]["x"])
    assert rel_err(y, fx["ref"][name]) < 1e-5


def test_bn_settings_come_from_the_source_config(fx):
    from converter import convert

    bn = convert(fx["files"]["flat"]["keras"], target("flat")).bn_config
    assert (bn["norms.1"]["momentum"], bn["norms.1"]["eps"]) == (pytest.approx(0.01), 1e-3)
    assert (bn["norms.0"]["momentum"], bn["norms.0"]["eps"]) == (pytest.approx(0.1), 1e-5)


def test_flatten_and_folded_bias_are_drafted(fx):
    from converter.drafting import draft

    rules = {r["source_layer"]: r for r in draft(fx["files"]["flat"]["h5"], target("flat")).rows()}
    assert rules["fc1"]["transform"] == "dense_after_flatten"
    assert rules["fc1"]["args"] == {"hwc": [4, 4, 8]}
    assert rules["fc2"]["transform"] == "dense"
    assert rules["conv1"]["fold_bias"] == "norms.1"


def test_drafted_table_passes_back_with_mapping(fx, tmp_path, cli):
    from converter import convert

    src = fx["files"]["resblock"]["keras"]
    table = tmp_path / "resblock.toml"
    rc, _, err = cli("draft", src, "--to", target("resblock"), "-o", table)
    assert rc == 0, err
    assert "conv_s (Conv2D) -> shortcut.0 (Conv2d) [conv2d]" in err
    text = table.read_text()
    assert 'source = "^conv_s$"\ntarget = "shortcut.0"' in text
    assert "# conv_s (Conv2D): kernel (3, 3, 8, 8), bias (8,)" in text
    rc, out, err = cli(
        "draft", src, "--to", target("resblock"), "-o", tmp_path / "j.toml", "--json"
    )
    rows = {r["source_layer"]: r for r in json.loads(out)["rules"]}
    assert rc == 0 and rows["bn_s"]["target_module"] == "shortcut.1", err
    again = convert(src, target("resblock"), mapping=table)
    assert again.drafted is None and again.table_id == "drafted"
    fresh = convert(src, target("resblock"))
    assert all(np.array_equal(again.state_dict[k], v) for k, v in fresh.state_dict.items())


def test_ambiguous_block_is_refused_with_candidates(fx, tmp_path, cli):
    out = tmp_path / "branches.toml"
    rc, _, err = cli(
        "draft", fx["files"]["branches"]["keras"], "--to", target("branches"), "-o", out
    )
    assert_clean_error(rc, err, "leaves a choice", "left -> a | b", "right -> a | b", out=out)


def test_a_module_no_layer_fills_is_passed_through_and_named(fx):
    """A buffer-only module at the input (no Keras twin) does not hide the structure; the
    conversion's accounting names its tensor."""
    from converter import convert
    from converter.errors import MappingError

    with pytest.raises(MappingError, match=r"1 target tensors left unfilled: centre\.mean"):
        convert(fx["files"]["resblock"]["keras"], target("centred_resblock"))


def test_no_table_message_says_why_and_suggests_drafting(fx, tmp_path, cli):
    out = tmp_path / "x.safetensors"
    rc, _, err = cli("convert", fx["files"]["flat"]["keras"], "-o", out)
    assert_clean_error(
        rc, err, "no mapping table fits", "custom model", "--to path/to/model.py:factory", out=out
    )


def test_convert_drafts_writes_the_table_beside_and_verifies(fx, tmp_path, cli):
    """`ckptport convert SRC --to model.py:factory -o OUT` with no table: the drafted table lands
    beside the output and the layer-by-layer verification runs (Keras in a subprocess)."""
    out = tmp_path / "resblock.safetensors"
    rc, _, err = cli(
        "convert", fx["files"]["resblock"]["h5"], "--to", target("resblock"), "-o", out
    )
    assert rc == 0, err
    assert "mapping drafted from both structures (11 rules)" in err
    assert "verification: PASS" in err
    table = tmp_path / "resblock.mapping.toml"
    assert table.is_file()
    out.unlink()  # the table beside it is not overwritten without --force either, before any work
    before = table.read_bytes()
    rc, _, err = cli(
        "convert", fx["files"]["resblock"]["h5"], "--to", target("resblock"), "-o", out
    )
    assert_clean_error(rc, err, str(table), "--force", out=out)
    assert table.read_bytes() == before


def keras2_schema(path, out) -> None:
    """Rewrite a Keras 3 legacy .h5's model config in the Keras 2 schema published files have:
    class ``Model``, ``batch_input_shape``, inbound nodes as ``[layer, node, tensor, kwargs]``."""
    import json
    import shutil

    import h5py

    shutil.copy(path, out)
    with h5py.File(out, "r+") as f:
        cfg = json.loads(f.attrs["model_config"])
        cfg["class_name"] = "Model"
        for layer in cfg["config"]["layers"]:
            if "batch_shape" in layer["config"]:
                layer["config"]["batch_input_shape"] = layer["config"].pop("batch_shape")
            layer["inbound_nodes"] = [
                [[*t["config"]["keras_history"], {}] for t in _keras_tensors(node)]
                for node in layer["inbound_nodes"]
            ]
        cfg["config"]["output_layers"] = [cfg["config"]["output_layers"]]
        cfg["config"]["input_layers"] = [cfg["config"]["input_layers"]]
        f.attrs["model_config"] = json.dumps(cfg)


def _keras_tensors(obj) -> list:
    if isinstance(obj, dict):
        if obj.get("class_name") == "__keras_tensor__":
            return [obj]
        return [t for v in obj.values() for t in _keras_tensors(v)]
    if isinstance(obj, list):
        return [t for v in obj for t in _keras_tensors(v)]
    return []


def test_keras2_schema_h5_drafts_the_same(fx, tmp_path):
    from converter import convert

    src = tmp_path / "keras2.h5"
    keras2_schema(fx["files"]["resblock"]["h5"], src)
    result = convert(src, target("resblock"))
    assert {m.source_layer: m.target_module for m in result.layers} == EXPECTED["resblock"]
    fresh = convert(fx["files"]["resblock"]["h5"], target("resblock"))
    assert all(np.array_equal(result.state_dict[k], v) for k, v in fresh.state_dict.items())


@pytest.mark.slow  # two TensorFlow processes (the user's Keras code, then verification): ~40 s
def test_weights_h5_with_source_model_converts_and_verifies(fx, tmp_path):
    """The CLI a user runs: a config-less .weights.h5, their Keras code, their PyTorch module; the
    drafted table lands beside the output and the layer-by-layer verification passes. Its own
    process: --source-model imports TensorFlow."""
    out = tmp_path / "flat.safetensors"
    cmd = [sys.executable, "-m", "converter", "convert", fx["files"]["flat"]["weights.h5"]]
    cmd += ["--source-model", f"{DRAFT_GENERATOR}:flat", "--to", target("flat"), "-o", out]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mapping drafted from both structures (6 rules)" in proc.stderr
    assert "verification: PASS" in proc.stderr
    assert (tmp_path / "flat.mapping.toml").is_file()


def test_shipped_architecture_drafted_onto_timm_equals_its_table(tmp_path):
    """MobileNetV3Small onto timm's tf_mobilenetv3_small_100 (Conv2dSame, BatchNormAct2d, SE
    blocks, a 1x1-conv classifier, Rescaling at the input): the drafted table gives the
    hand-written table's tensors, BN settings and recorded preprocessing."""
    from converter import convert
    from converter.drafting import draft

    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    src = make_keras_fixture(fn, kw, inp, ["keras"])["files"]["keras"]
    to = "timm:tf_mobilenetv3_small_100"
    shipped = convert(src, to)
    table = draft(src, to).write(tmp_path / "mnv3.toml")
    drafted = convert(src, to, mapping=table)
    assert drafted.state_dict.keys() == shipped.state_dict.keys()
    assert all(np.array_equal(drafted.state_dict[k], v) for k, v in shipped.state_dict.items())
    assert drafted.bn_config == shipped.bn_config
    assert drafted.preprocessing == shipped.preprocessing and drafted.preprocessing["steps"]


def _k3(name: str, cls: str, *inputs: str, **config) -> dict:
    """A Keras 3 functional layer entry reading ``inputs``."""
    tensors = [
        {"class_name": "__keras_tensor__", "config": {"keras_history": [i, 0, 0]}} for i in inputs
    ]
    args = [tensors] if len(tensors) > 1 else tensors
    return {
        "class_name": cls,
        "config": {"name": name, **config},
        "inbound_nodes": [{"args": args, "kwargs": {}}] if inputs else [],
    }


def test_graph_flattens_nested_models_and_contracts_to_weighted_nodes():
    """A nested Sequential block and a nested Functional model are flattened in place with their
    scope; the contracted edges skip unweighted layers (ReLU, Add)."""
    from converter.drafting.graph import INPUT, graph_from_keras_config

    block = {
        "class_name": "Sequential",
        "config": {
            "name": "block",
            "layers": [
                {"class_name": "InputLayer", "config": {"name": "block_in"}},
                {"class_name": "Conv2D", "config": {"name": "b_conv", "kernel_size": [3, 3]}},
                {"class_name": "ReLU", "config": {"name": "b_relu"}},
            ],
        },
        "inbound_nodes": _k3("block", "Sequential", "stem")["inbound_nodes"],
    }
    inner = {
        "class_name": "Functional",
        "config": {
            "name": "inner",
            "layers": [
                _k3("inner_in", "InputLayer", batch_shape=[None, 8, 8, 4]),
                _k3("i_conv", "Conv2D", "inner_in", strides=[2, 2]),
            ],
            "input_layers": [["inner_in", 0, 0]],
            "output_layers": [["i_conv", 0, 0]],
        },
        "inbound_nodes": _k3("inner", "Functional", "add")["inbound_nodes"],
    }
    config = {
        "class_name": "Functional",
        "config": {
            "name": "m",
            "layers": [
                _k3("x", "InputLayer", batch_shape=[None, 8, 8, 3]),
                _k3("stem", "Conv2D", "x"),
                block,
                _k3("add", "Add", "block", "stem"),
                inner,
                _k3("head", "Dense", "inner", activation="relu"),
            ],
            "input_layers": [["x", 0, 0]],
            "output_layers": ["head", 0, 0],
        },
    }
    weights = {n: {"kernel": (1,)} for n in ("stem", "b_conv", "i_conv", "head")}
    graph = graph_from_keras_config(config, weights)
    assert [n.name for n in graph.weighted] == ["stem", "b_conv", "i_conv", "head"]
    assert graph.by_name["b_conv"].scope == "block" and graph.by_name["i_conv"].scope == "inner"
    assert graph.by_name["x"].kind == INPUT and graph.input_shape() == (8, 8, 3)
    assert graph.weighted_inputs("b_conv") == {"stem"}
    assert graph.weighted_inputs("i_conv") == {"b_conv", "stem"}  # through Add and ReLU
    assert graph.weighted_inputs("head") == {"i_conv"}
    assert graph.by_name["i_conv"].attrs["strides"] == (2, 2)
    assert graph.by_name["head"].attrs["activation"] == "relu"
    assert graph.outputs == ("head",)


def test_graph_refuses_a_shared_layer_and_follows_keras2_nested_node_indices():
    """A layer called twice (on two different tensors) is refused by name; a Keras 2 config refers
    to a nested model's first call as node 1 (its construction is node 0), which still leads to
    the nested model's output."""
    from converter.drafting.graph import graph_from_keras_config
    from converter.errors import MappingError

    def functional(name, layers, inputs, outputs):
        cfg = {"name": name, "layers": layers, "input_layers": inputs, "output_layers": outputs}
        return {"class_name": "Functional", "config": cfg}

    shared = _k3("dense", "Dense", "a")
    shared["inbound_nodes"] += _k3("dense", "Dense", "b")["inbound_nodes"]
    layers = [_k3("a", "InputLayer"), _k3("b", "InputLayer"), shared]
    config = functional("m", layers, [["a", 0, 0], ["b", 0, 0]], [["dense", 1, 0]])
    with pytest.raises(MappingError, match="layer 'dense' is called more than once"):
        graph_from_keras_config(config, {})

    inner = functional(
        "inner", [_k3("i", "InputLayer"), _k3("c", "Conv2D", "i")], [["i", 0, 0]], [["c", 0, 0]]
    )
    inner["inbound_nodes"] = [[["x", 0, 0, {}]]]
    head = {
        "class_name": "Dense",
        "config": {"name": "head"},
        "inbound_nodes": [[["inner", 1, 0, {}]]],
    }
    config = functional("m", [_k3("x", "InputLayer"), inner, head], [["x", 0, 0]], [["head", 0, 0]])
    graph = graph_from_keras_config(config, {"c": {"kernel": (1,)}, "head": {"kernel": (1,)}})
    assert graph.weighted_inputs("c") == {"x"} and graph.weighted_inputs("head") == {"c"}
    assert graph.by_name["c"].scope == "inner" and graph.outputs == ("head",)


def test_graph_of_a_keras2_sequential_without_input_layer():
    """Keras 2 Sequential configs start with the first layer, which carries the input shape."""
    from converter.drafting.graph import graph_from_keras_config

    first = {"name": "c", "batch_input_shape": [None, 28, 28, 1], "kernel_size": [3, 3]}
    config = {
        "class_name": "Sequential",
        "config": {
            "name": "s",
            "layers": [
                {"class_name": "Conv2D", "config": first},
                {"class_name": "Flatten", "config": {"name": "f"}},
                {"class_name": "Dense", "config": {"name": "d"}},
            ],
        },
    }
    graph = graph_from_keras_config(config, {"c": {"kernel": (3, 3, 1, 4)}, "d": {"kernel": (1,)}})
    assert graph.input_shape() == (28, 28, 1)
    assert graph.weighted_inputs("c") == {"input"} and graph.weighted_inputs("d") == {"c"}
    assert graph.outputs == ("d",)


def test_a_branched_model_without_connections_is_refused_as_a_chain(fx):
    """Where the source stores no connections (TF1 checkpoints) its layers are drafted as a chain
    in creation order; a residual block then fails the structure check, and the error says the
    source was chained and that a table is needed."""
    from converter.drafting import draft_for_source
    from converter.source import resolve_source
    from converter.errors import MappingError

    source = resolve_source(fx["files"]["resblock"]["keras"])
    cfg = source.raw.model_config["config"]
    for key in ("input_layers", "output_layers"):
        del cfg[key]
    for entry in cfg["layers"]:
        entry.pop("inbound_nodes", None)
    with pytest.raises(MappingError, match="drafted as a chain in creation order.*--mapping"):
        draft_for_source(source, target("resblock"))


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("torchvision:resnet999", "torchvision has no model 'resnet999'"),
        ("timm:nonexist", "timm has no model 'nonexist'"),
        (str(TWINS), "names a file but no function: add ':factory'"),
        (f"{TWINS}:", "must end in ':function'"),
        (":x", "must end in ':function'"),
    ],
)
def test_a_bad_to_names_itself_before_source_and_output(fx, tmp_path, cli, spec, needle):
    """A bad --to on a Keras source is the error (not "no table fits this source"), and it comes
    before the output-exists check; an unrelated name gets no "close" noise."""
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"x")
    for command in ("convert", "draft"):
        rc, _, err = cli(command, fx["files"]["flat"]["keras"], "--to", spec, "-o", existing)
        assert_clean_error(rc, err, needle)
        assert "no mapping table fits" not in err and "close: nfnet" not in err


def test_eps_the_user_module_is_built_without_is_named(fx, tmp_path, cli):
    """flat's bn1 has Keras' eps 1e-3 where FlatNet's norms.1 is built with 1e-5 (bn2/norms.0
    agree): a plain load_state_dict would keep 1e-5, so convert and draft say which and the fix."""
    from converter import convert
    from converter.drafting import draft

    src = fx["files"]["flat"]["keras"]
    want = "norms.1 constructed with eps=1e-05, the source's is 0.001; converter.load_model"
    (note,) = [n for n in convert(src, target("flat")).notes if "eps" in n]
    assert want in note and "norms.0" not in note
    assert draft(src, target("flat")).notes == [note]
    rc, _, err = cli("draft", src, "--to", target("flat"), "-o", tmp_path / "flat.toml")
    assert rc == 0 and f"note: BatchNorm eps: {want}" in " ".join(err.split()), err


def test_a_custom_source_reports_no_guessed_head(fx, tmp_path, cli):
    """resblock ends in GlobalAveragePooling -> Dense(5), and no table knows its [head]: inspect
    and convert describe none (it used to say "headless, pooling none (feature map)")."""
    src = fx["files"]["resblock"]["keras"]
    rc, out, err = cli("inspect", src, "--json")
    assert rc == 0 and json.loads(out)["head"] is None, err
    rc, _, err = cli("inspect", src)
    assert rc == 0 and "head:" not in err and "headless" not in err, err
    rc, out, err = cli(
        "convert", src, "--to", target("resblock"), "-o", tmp_path / "r.st", "--json", "--no-verify"
    )
    assert rc == 0 and json.loads(out)["source_head"] is None, err


GELU_TWIN = """

class GeluResBlockNet(ResBlockNet):
    def forward(self, x):
        x = self.stem(x)
        short = self.shortcut(x)
        main = self.bn_b(self.conv_b(F.gelu(self.bn_a(self.conv_a(x)))))
        return self.fc(F.relu(self.bn_c(self.down(F.relu(main + short)))).mean(dim=(2, 3)))


def gelu_resblock():
    return GeluResBlockNet()
"""


def test_convert_mismatch_names_the_first_divergent_layer(fx, tmp_path, cli):
    """A drafted conversion whose module computes something else (gelu for relu after bn_a):
    convert's verification prints where it diverges, as verify does."""
    twin = tmp_path / "twin.py"
    twin.write_text(TWINS.read_text() + GELU_TWIN)
    out = tmp_path / "g.safetensors"
    rc, _, err = cli(
        "convert", fx["files"]["resblock"]["keras"], "--to", f"{twin}:gelu_resblock", "-o", out
    )
    assert rc == 1 and "verification: MISMATCH" in err, err
    assert "first divergent layer conv_b -> conv_b (rel " in err and "hint:" not in err, err


def test_padding_hint_for_a_strided_same_conv():
    from converter.verification import padding_hints

    taps = [(0, "stem", "stem"), (1, "down", "down")]
    same = [{}, {"class": "Conv2D", "padding": "same", "strides": [2, 2]}]
    first = {"source_layer": "down", "target_module": "down", "rel": 0.3}
    (hint,) = padding_hints(first, taps, same)
    assert "down (Conv2D) has padding 'same' with strides (2, 2)" in hint and "0 before" in hint
    assert padding_hints({**first, "source_layer": "stem"}, taps, same) == []
    assert padding_hints(first, taps, [{}, {**same[1], "padding": "valid"}]) == []
    assert padding_hints(None, taps, same) == []


# A factory module that records where the model was built and whether its forward read a value.
DEVICE_PROBE = """
import importlib.util, os

spec = importlib.util.spec_from_file_location("draft_twins_probe", {twins!r})
twins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(twins)


def _seen(what):
    with open(os.environ["DRAFT_PROBE"], "a") as fh:
        fh.write(what + "\\n")


def build():
    model = twins.flat()
    _seen(next(model.parameters()).device.type)
    return model


def build_reading_values():
    model = build()
    forward = model.forward

    def reads_a_value(x):
        _seen("value " + str(float(x.abs().sum().item())))  # no values on the meta device
        return forward(x)

    model.forward = reads_a_value
    return model
"""


@pytest.mark.parametrize(
    "factory, seen",
    [
        ("build", ["meta"]),
        # traced on storage that reads as zeros, not built again for real
        ("build_reading_values", ["meta", "value 0.0"]),
    ],
)
def test_draft_builds_the_target_on_meta(fx, factory, seen, tmp_path, monkeypatch):
    """Drafting needs the target's structure only: the module is built on the meta device (a
    2 GiB module allocates nothing) and traced on CPU storage that reads as zeros, so a forward
    that reads tensor values runs too, with the same draft."""
    from converter.drafting import draft

    probe = tmp_path / "probe.py"
    probe.write_text(DEVICE_PROBE.format(twins=str(TWINS)))
    monkeypatch.setenv("DRAFT_PROBE", str(tmp_path / "seen.txt"))
    rows = draft(fx["files"]["flat"]["keras"], f"{probe}:{factory}").rows()
    assert {r["source_layer"]: r["target_module"] for r in rows} == EXPECTED["flat"]
    assert (tmp_path / "seen.txt").read_text().split("\n")[:-1] == seen


def test_a_drafted_table_converts_without_pytorch_while_the_module_is_unchanged(fx, tmp_path):
    """The drafted table records the module's manifest and its file's sha256: converting with it
    imports no PyTorch (a multi-GB source then streams in little memory) and writes the same
    bytes; once the file changes, the record no longer applies and the module is built."""
    import shutil
    import subprocess
    import sys

    from converter import convert, draft
    from converter.pipeline import recorded_target_manifest
    from converter.tables import load_table

    src = fx["files"]["resblock"]["keras"]
    module = shutil.copy(TWINS, tmp_path / "models.py")
    to = f"{module}:resblock"
    table = draft(src, to).write(tmp_path / "resblock.mapping.toml")
    script = (
        "import sys, converter\n"
        "converter.convert_file(sys.argv[1], sys.argv[2], sys.argv[3], mapping=sys.argv[4])\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))\n"
    )
    out = tmp_path / "streamed.safetensors"
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out), to, str(table)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    held = convert(src, to, mapping=table).save(tmp_path / "held.safetensors")
    assert out.read_bytes() == held.read_bytes()
    loaded = load_table(table)
    assert recorded_target_manifest(loaded, loaded.variants[0]) is not None
    with open(module, "a") as fh:
        fh.write("\n# edited after drafting\n")
    assert recorded_target_manifest(loaded, loaded.variants[0]) is None
    built = convert(src, to, mapping=table).save(tmp_path / "built.safetensors")
    assert built.read_bytes() == out.read_bytes()  # the record is what the module builds


def test_a_drafting_conversion_loads_no_pytorch_the_child_traces(fx, tmp_path):
    """In a process without PyTorch, drafting traces the module in a child process: the
    converting process streams the source with torch never imported, and writes the table and
    bytes drafting in this process (PyTorch loaded) writes."""
    from converter import convert_file

    src = fx["files"]["resblock"]["keras"]
    to = target("resblock")
    script = (
        "import sys, converter\n"
        "converter.convert_file(sys.argv[1], sys.argv[2], sys.argv[3])\n"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))\n"
    )
    out = tmp_path / "child" / "m.safetensors"
    out.parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out), to],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:]
    here = convert_file(src, tmp_path / "here.safetensors", to)[1]
    assert out.read_bytes() == here.read_bytes()
    child_table = (tmp_path / "child" / "m.mapping.toml").read_text()
    assert child_table == (tmp_path / "here.mapping.toml").read_text()


CHILD_FAILURES = """
import torch
from torch import nn


def raises():
    raise ValueError("factory says no")


def wrong_input():
    return nn.Sequential(nn.Linear(7, 3))
"""


@pytest.mark.parametrize(
    "factory, needles",
    [
        ("raises", ["ConverterError", "ValueError: factory says no"]),
        ("wrong_input", ["MappingError", "running the target on a dummy input failed"]),
    ],
)
def test_the_child_s_failure_is_the_same_one_line_error(fx, tmp_path, factory, needles):
    """What the trace raises in the child is raised again here as the same class and message."""
    module = tmp_path / "failing.py"
    module.write_text(CHILD_FAILURES)
    script = (
        "import sys\n"
        "from converter import draft\n"
        "try:\n"
        "    draft(sys.argv[1], sys.argv[2])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(fx["files"]["resblock"]["keras"]), f"{module}:{factory}"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-2000:]
    assert all(n in lines[0] for n in needles), lines[0]
    assert lines[1] == "False" and "Traceback" not in proc.stderr


def test_tracing_a_meta_built_module_imports_no_dynamo(tmp_path):
    """The meta-built module is traced on zero-reading CPU storage: PyTorch's Python meta kernels
    (which import torch._dynamo, +160 MiB resident) never run; large tensors stay fresh
    mappings (zeros), small ones are zeroed."""
    script = (
        "import sys, torch\n"
        "from converter.drafting.target import on_empty_cpu, trace_target, FRESH_MAPPING_BYTES\n"
        "with torch.device('meta'):\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4096, 2200), torch.nn.BatchNorm1d(2200))\n"
        "assert m[0].weight.nelement() * 4 > FRESH_MAPPING_BYTES\n"
        "g = trace_target(on_empty_cpu(m), [(1, 4096)])\n"
        "print([n.name for n in g.nodes], 'torch._dynamo' in sys.modules,\n"
        "      float(m[1].running_var.abs().sum()), float(m[0].weight.abs().sum()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["['0',", "'1']", "False", "0.0", "0.0"]


def test_tensor_records_ignore_a_dead_tensor_s_reused_id():
    """The trace keeps no activation alive; a record of a tensor that died must not pass to a new
    tensor that got its id (CPython reuses a freed object's memory at once)."""
    import torch

    from converter.drafting.target import TensorRecords

    records = TensorRecords()
    a = torch.zeros(3)
    records[a] = "a"
    assert records.get(a) == "a"
    key = id(a)
    del a
    b = torch.zeros(3)
    if id(b) != key:
        pytest.skip("this interpreter did not reuse the id: nothing to check")
    assert records.get(b) is None
