"""--num-classes: the source classifier is dropped (and reported), the new head is initialised the
architecture's way (a fresh model's constructor init), not with a bare nn.Linear default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import converter
from helpers import keras_build_args, make_keras_fixture
from converter.cli import main
from converter.model import build_target, load_model

# (source, head module, does the architecture initialise its head unlike a bare nn.Linear?)
# timm EfficientNet: uniform(+-1/sqrt(out)), zero bias; torchvision ResNet keeps nn.Linear's default.
CASES = [("keras:EfficientNetB0", "classifier", True), ("keras:ResNet50", "fc", False),
         ("keras:DenseNet121", "classifier", False),  # torchvision DenseNet: nn.Linear weight init, bias 0
         ("keras:InceptionV3", "fc", True)]  # torchvision Inception3: truncated normal std 0.1 (init_weights)


def src_of(source_id):
    fn, kw, inp = keras_build_args(source_id)
    return make_keras_fixture(fn, kw, inp, ["keras"])["files"]["keras"]


@pytest.mark.parametrize("source_id,head,own_init", CASES)
def test_head_reset_architecture_init(source_id, head, own_init, tmp_path):
    src = src_of(source_id)
    plain = converter.convert(src)
    result = converter.convert(src, num_classes=10)
    w, b = result.state_dict[f"{head}.weight"], result.state_dict[f"{head}.bias"]
    assert w.shape[0] == 10 and b.shape == (10,)
    # the trunk is exactly the plain conversion; only the head changed
    for k, v in plain.state_dict.items():
        if not k.startswith(head + "."):
            np.testing.assert_array_equal(result.state_dict[k], v)
    dropped = [d for d in result.dropped if "classifier dropped" in d["why"]]
    assert len(dropped) == 2  # the classifier's kernel and bias, listed in the output's report
    assert result.head_reset["num_classes"] == 10 and result.head_reset["dropped_source_layers"]

    # init statistics: like fresh models of that architecture (other seeds), unlike a bare nn.Linear
    fresh = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        fresh.append(build_target(result.target, num_classes=10).state_dict()[f"{head}.weight"].numpy())
    fresh_std = np.mean([f.std() for f in fresh])
    assert w.std() == pytest.approx(fresh_std, rel=0.15)
    size = keras_build_args(source_id)[2]["size"]
    bare = torch.nn.Linear(w.shape[1], 10).weight.detach().numpy()
    if own_init:  # a bare nn.Linear would have been visibly wrong here
        assert abs(w.std() - bare.std()) > 0.3 * bare.std()
        assert not b.any() or source_id == "keras:InceptionV3"  # zero bias, as the architecture sets it
    else:
        assert w.std() == pytest.approx(bare.std(), rel=0.15)

    model = load_model(result.save(tmp_path / "m.safetensors"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 10)


def test_head_reset_is_deterministic_and_cli_reports(tmp_path, capsys):
    src = src_of("keras:EfficientNetB0")
    a = converter.convert(src, num_classes=7).save(tmp_path / "a.safetensors")
    rc = main(["convert", src, "--num-classes", "7", "-o", str(tmp_path / "b.safetensors"), "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and a.read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert info["head_reset"]["num_classes"] == 7 and info["head_reset"]["dropped_source_layers"] == ["predictions"]
    assert any("classifier dropped" in d["why"] for d in info["dropped"])


def test_head_reset_errors(tmp_path):
    src = src_of("keras:EfficientNetB0")
    with pytest.raises(converter.ConverterError, match="num_classes must be >= 1"):
        converter.convert(src, num_classes=0)
