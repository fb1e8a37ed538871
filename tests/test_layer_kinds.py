"""Layer kinds beyond keras.applications (converter/layer_kinds.py): tiny Keras models of each
family (fixtures/keras_layers.py, all built in ONE cached subprocess) converted onto PyTorch modules
written as a user would (fixtures/layer_models.py, BN at PyTorch defaults) through explicit
tables; outputs compared with Keras at float32 rounding, one training-mode BN step compared, the
layer-level inverses round-tripped and the refusals checked."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from helpers import CACHE, ROOT, cached_build

from converter.errors import UnsupportedLayerError
from converter.layer_kinds import KindTransform, transpose_crop, transpose_padding
from converter.transforms import TRANSFORMS, LayerContext

GENERATOR = ROOT / "fixtures" / "keras_layers.py"
TARGETS = ROOT / "fixtures" / "layer_models.py"

# model -> rules (Keras layer = torch module, transform, extra TOML)
TABLES = {
    "conv1d": [
        ("conv", "conv1d", ""),
        ("bn", "batch_norm", ""),
        ("gconv", "conv1d", ""),
        ("dw", "depthwise_conv", ""),
        ("sep", "separable_conv1d", ""),
        ("deconv", "conv_transpose1d", ""),
        ("fc", "dense", ""),
    ],
    "conv2d": [
        ("dw", "depthwise_conv", ""),
        ("bn", "batch_norm", ""),
        ("deconv", "conv_transpose2d", ""),
        ("deconv_same", "conv_transpose2d", ""),
        ("conv_b", "conv2d", "fold_bias = 'bn_b'\ntap = false\n"),
        ("bn_b", "batch_norm", ""),
        ("prelu", "prelu", ""),
        ("sep", "separable_conv2d", ""),
        ("fc", "dense", ""),
    ],
    "conv3d": [
        ("conv", "conv3d", ""),
        ("bn", "batch_norm", ""),
        ("gconv", "conv3d", ""),
        ("deconv", "conv_transpose3d", ""),
        ("fc", "dense", ""),
    ],
    "seq": [
        ("emb", "embedding", ""),
        ("lstm", "lstm", ""),
        ("gru", "gru", ""),
        ("proj", "dense", ""),
        ("ln", "layer_norm_last", ""),
        ("bn", "batch_norm", ""),
        ("bn_t", "batch_norm", ""),
        ("rnn", "simple_rnn", ""),
        ("prelu", "prelu", ""),
        ("fc", "dense", ""),
    ],
    "birnn": [("bilstm", "bidirectional", ""), ("bigru", "bidirectional", ""), ("fc", "dense", "")],
}
SEQUENCES = {"seq", "birnn"}
TO_TORCH = {2: (), 3: (0, 2, 1), 4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}


def table_text(model: str) -> str:
    """An explicit table: one rule per Keras layer, onto the module of the same name."""
    text = (
        f'[table]\nid = "layers-{model}"\nversion = 1\n[input]\nsize = 8\nrange = [-1.0, 1.0]\n'
        f'[[variants]]\ntarget = "{TARGETS}:{model}"\n'
    )
    for name, transform, extra in TABLES[model]:
        text += f"[[rules]]\nsource = '^{name}$'\ntarget = '{name}'\ntransform = '{transform}'\n"
        text += extra
    return text


@pytest.fixture(scope="module")
def kinds():
    version = hashlib.sha256(GENERATOR.read_bytes()).hexdigest()[:12]
    info = cached_build(CACHE / f"layer-kinds-{version}", GENERATOR, [])
    return info, dict(np.load(info["dir"] / "reference.npz"))


@pytest.fixture(scope="module")
def converted(kinds, tmp_path_factory):
    """Each model converted through its table and loaded (surgeries, BN config, strict load)."""
    from converter import convert, load_model

    info, _ = kinds
    d = tmp_path_factory.mktemp("kinds")
    out = {}
    for model in TABLES:
        (d / f"{model}.toml").write_text(table_text(model))
        result = convert(info["files"][model], mapping=d / f"{model}.toml")
        path = result.save(d / f"{model}.safetensors")
        out[model] = (result, load_model(path), path, d / f"{model}.toml")
    return out


def torch_input(x: np.ndarray, model: str):
    """Token ids as int64, sequences batch-first as they are, images/audio/volumes channels-first."""
    import torch

    if x.dtype.kind == "i":
        return torch.from_numpy(x.astype(np.int64))
    if model in SEQUENCES:
        return torch.from_numpy(x)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(TO_TORCH[x.ndim])))


@pytest.mark.parametrize("model", list(TABLES))
def test_outputs_match_keras(kinds, converted, model):
    import torch

    _, ref = kinds
    with torch.no_grad():
        got = converted[model][1](torch_input(ref[f"{model}/x"], model)).numpy()
    want = ref[f"{model}/y"]
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-5, f"{model}: max error {err:.2e} of the output's range"


@pytest.mark.parametrize("model", ["conv1d", "conv2d", "conv3d", "seq"])
def test_bn_training_step_matches_keras(kinds, converted, model):
    """One training-mode forward pass: each BN's running-stat update equals Keras' (momentum 1-m,
    eps carried; PyTorch's unbiased variance accounted exactly), the folded conv bias included."""
    import torch

    _, ref = kinds
    result, net, _, _ = converted[model]
    before = {k: (m.running_mean.clone(), m.running_var.clone()) for k, m in _bns(net)}
    for _, m in _bns(net):
        m.train()
    with torch.no_grad():
        net(torch_input(ref[f"{model}/x"], model))
    net.eval()
    for name, m in _bns(net):
        k = {
            s: ref[f"{model}/bn/{name}/{s}"].astype(np.float64)
            for s in ("mean0", "mean1", "var0", "var1")
        }
        keras_m = 1.0 - m.momentum
        assert result.bn_config[name]["keras_momentum"] == pytest.approx(keras_m)
        n = _batch_count(ref[f"{model}/x"], net, name, model)
        batch_var = (k["var1"] - keras_m * k["var0"]) / (1 - keras_m)
        want_var = k["var1"] - k["var0"] + m.momentum * batch_var / (n - 1)
        d_mean = (m.running_mean - before[name][0]).double().numpy()
        d_var = (m.running_var - before[name][1]).double().numpy()
        np.testing.assert_allclose(d_mean, k["mean1"] - k["mean0"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(d_var, want_var, rtol=1e-4, atol=1e-6)


def _bns(net):
    import torch

    return [
        (n, m)
        for n, m in net.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]


def _batch_count(x: np.ndarray, net, name: str, model: str) -> int:
    """Elements per channel the BN saw (batch times the positions of its input)."""
    import torch

    seen = {}

    def count(module, inputs, output) -> None:
        seen["n"] = inputs[0].numel() // inputs[0].shape[1]

    hook = dict(net.named_modules())[name].register_forward_hook(count)
    with torch.no_grad():
        net(torch_input(x, model))
    hook.remove()
    return seen["n"]


@pytest.mark.parametrize("model", ["seq", "birnn"])
def test_legacy_h5_recurrent_weights_convert_the_same(kinds, converted, model):
    """Legacy HDF5 names sublayer weights by path (``bilstm/forward_lstm/lstm_cell/kernel``):
    the same tensors as from the .keras file."""
    from converter import convert

    info, _ = kinds
    result = convert(info["files"][f"{model}.h5"], mapping=converted[model][3])
    want = converted[model][0].state_dict
    assert result.state_dict.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_array_equal(result.state_dict[k], v, err_msg=k)


def test_bn_config_carried(converted):
    """momentum 1-m and the Keras eps per module, whatever the axis."""
    cfg = {m: converted[m][0].bn_config for m in ("conv1d", "conv2d", "seq")}
    assert cfg["conv1d"]["bn"]["momentum"] == pytest.approx(0.1)
    assert cfg["conv2d"]["bn"]["eps"] == pytest.approx(1e-5)
    assert cfg["conv2d"]["bn_b"]["eps"] == pytest.approx(1e-3)
    assert cfg["seq"]["bn_t"]["momentum"] == pytest.approx(0.01)


class _Layer:
    """A stand-in SourceLayer for transform round trips."""

    def __init__(self, name: str, config: dict, arrays: dict[str, np.ndarray]) -> None:
        self.name, self.config, self.arrays = name, config, arrays
        self.weights = {k: v for k, v in arrays.items()}
        self.keys: dict[str, str] = {}

    def load(self, var: str) -> np.ndarray:
        return self.arrays[var]


KINDS = [n for n in TRANSFORMS if isinstance(TRANSFORMS.get(n), KindTransform)]


@pytest.mark.parametrize("name", KINDS)
def test_kind_transforms_round_trip(name):
    """Keras variables -> PyTorch tensors (apply) -> Keras variables (to_keras), exactly."""
    t = TRANSFORMS.get(name)
    assert t.pairs, f"{name} declares no (Keras, torch) pairs"
    rng = np.random.default_rng(0)
    arrays = {v: rng.normal(size=s).astype(np.float32) for v, s in t.example["shapes"].items()}
    layer = _Layer("x", t.example["config"], arrays)
    emitted = t.apply(LayerContext(layer, "m", {}, {}))
    emitted_all = t.apply(LayerContext(layer, "m", _AnyKey(), {}))
    torch_side = {k.removeprefix("m."): v[0] for k, v in emitted_all.tensors.items()}
    assert emitted.consumed <= set(arrays) and emitted_all.consumed == set(arrays)
    back = t.to_keras(torch_side, layer.config, {v: a.shape for v, a in arrays.items()})
    assert back.keys() == arrays.keys()
    for v, a in arrays.items():
        np.testing.assert_allclose(back[v], a, rtol=1e-6, atol=1e-6)
    assert repr(t).startswith(name)
    params = t.tensor_params(layer.config, arrays_shapes(arrays))
    for var, (param, tt) in params.items():
        if var in arrays:  # what drafting checks shapes with
            assert tt(arrays[var]).shape == torch_side[param].shape


def arrays_shapes(arrays: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {v: a.shape for v, a in arrays.items()}


class _AnyKey(dict):
    """Target shapes that have every key (a module with every bias)."""

    def __contains__(self, key: object) -> bool:
        return True


def test_recurrent_semantics():
    """GRU gates z,r,h -> torch r,z,n; LSTM bias -> bias_ih, zeros bias_hh; GRU's two biases."""
    h = 2
    kernel = np.concatenate([np.full((3, h), g, np.float32) for g in (1, 2, 3)], axis=1)
    bias = np.stack([np.arange(3 * h, dtype=np.float32), -np.arange(3 * h, dtype=np.float32)])
    layer = _Layer("g", {}, {"kernel": kernel, "recurrent_kernel": kernel[:h], "bias": bias})
    out = TRANSFORMS.get("gru").apply(LayerContext(layer, "gru", _AnyKey(), {"layer": 1}))
    w = out.tensors["gru.weight_ih_l1"][0]
    assert w.shape == (3 * h, 3) and list(w[::h, 0]) == [2, 1, 3]  # r, z, n
    assert list(out.tensors["gru.bias_hh_l1"][0]) == [-2, -3, -0, -1, -4, -5]
    lstm = _Layer(
        "l",
        {},
        {"kernel": np.ones((3, 8)), "recurrent_kernel": np.ones((2, 8)), "bias": np.arange(8.0)},
    )
    out = TRANSFORMS.get("lstm").apply(LayerContext(lstm, "lstm", _AnyKey(), {}))
    assert list(out.tensors["lstm.bias_ih_l0"][0]) == list(range(8))
    assert not out.tensors["lstm.bias_hh_l0"][0].any()


@pytest.mark.parametrize(
    "transform, config, shapes, needle",
    [
        ("gru", {"reset_after": False}, {}, "reset_after=False"),
        ("lstm", {"stateful": True}, {}, "stateful=True"),
        ("lstm", {"go_backwards": True}, {}, "go_backwards=True"),
        ("lstm", {"activation": "relu"}, {}, "activation='relu'"),
        ("simple_rnn", {"activation": "sigmoid"}, {}, "tanh or relu"),
        ("bidirectional", {"layer": {"class_name": "LSTM"}, "merge_mode": "sum"}, {}, "merge_mode"),
        ("layer_norm_last", {"axis": 1}, {}, "trailing axes"),
        ("layer_norm_last", {"axis": -1, "rms_scaling": True}, {}, "rms_scaling"),
        ("prelu", {}, {"alpha": (4, 4, 3)}, "more than one axis"),
        (
            "conv_transpose2d",
            {"kernel_size": [3, 3], "strides": [2, 2], "padding": "same"},
            {"kernel": (3, 3, 4, 2)},
            "cannot express",
        ),
    ],
)
def test_refusals_name_layer_and_fix(transform, config, shapes, needle):
    arrays = {v: np.zeros(s, np.float32) for v, s in shapes.items()}
    with pytest.raises(UnsupportedLayerError, match="layer 'lay'") as exc:
        TRANSFORMS.get(transform).apply(LayerContext(_Layer("lay", config, arrays), "m", {}, {}))
    assert needle in str(exc.value) and ";" in str(exc.value)


def test_transpose_padding_semantics():
    """(padding, output_padding) torch needs, from Keras' crop of the full transposed output."""
    assert transpose_padding(3, 2, 1, "valid", None) == (0, 0)
    assert transpose_padding(4, 2, 1, "same", None) == (1, 0)
    assert transpose_padding(3, 1, 1, "same", None) == (1, 0)
    assert transpose_padding(1, 2, 1, "valid", None) == (0, 1)  # (n-1)*s + max(k, s)
    assert transpose_padding(3, 2, 1, "same", None) is None
    assert transpose_crop(3, 2, 1, "same", None) == (0, 1)  # crops 0 before, 1 after


def test_transpose_cropped_in_forward_is_the_escape():
    """The refusal's fix: a module that crops its output itself takes the weights as they are."""
    cfg = {"kernel_size": [3, 3], "strides": [2, 2], "padding": "same"}
    layer = _Layer("up", cfg, {"kernel": np.ones((3, 3, 4, 2), np.float32)})
    args = {"cropped_in_forward": True}
    out = TRANSFORMS.get("conv_transpose2d").apply(LayerContext(layer, "up", _AnyKey(), args))
    assert out.tensors["up.weight"][0].shape == (2, 4, 3, 3)


@pytest.mark.parametrize(
    "model",
    # one Keras process each (~12 s on 2 busy cores): audio and token-id sequences run always
    [
        "conv1d",
        "seq",
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("conv2d", "conv3d", "birnn")),
    ],
)
def test_verify_layer_by_layer(kinds, converted, model):
    """`verify` feeds each source its own input (NWC audio, grayscale, NDHWC volumes, token ids,
    float sequences), lays each tapped output out as PyTorch does (channels first for convs and
    BNs over the last axis, batch-first sequences, a recurrent layer's last state) and compares
    one BN training step."""
    from converter import verify

    info, _ = kinds
    _, _, path, table = converted[model]
    report = verify(info["files"][model], path, mapping=table, train_step=True, batch=3)
    assert report.passed, report.first_divergent
    assert report.input_shape[1:] == list(kinds[1][f"{model}/x"].shape[1:])
    tapped = [r.source_layer for r in report.layers]
    assert tapped == [n for n, _, extra in TABLES[model] if "tap = false" not in extra]
    assert len(report.train_step or []) == sum(t == "batch_norm" for _, t, _ in TABLES[model])


def test_verify_inputs_must_fit_the_source(kinds, converted, tmp_path):
    from converter import verify
    from converter.errors import VerificationError

    info, _ = kinds
    _, _, path, table = converted["seq"]
    np.save(tmp_path / "images.npy", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(VerificationError, match=r"the source takes \(batch, 7\)"):
        verify(info["files"]["seq"], path, mapping=table, inputs=tmp_path / "images.npy")


@pytest.mark.parametrize("output_io", ["buffered", "direct"])
def test_a_bias_folded_into_a_streamed_running_mean(kinds, converted, output_io, tmp_path,
                                                    monkeypatch):  # fmt: skip
    """Every tensor streamed to the output as it is placed (the spill size at 0): the conv bias
    folded into the BN's running mean afterwards rewrites that tensor in the file, buffered or
    direct, and the file is the held conversion's byte for byte."""
    from converter import convert_file, ledger

    info, _ = kinds
    _, _, held, table = converted["conv2d"]
    monkeypatch.setattr(ledger, "SPILL_BYTES", 0)
    out = tmp_path / "streamed.safetensors"
    convert_file(info["files"]["conv2d"], out, mapping=table, output_io=output_io)
    assert out.read_bytes() == held.read_bytes()
