"""One test per claim in docs/batchnorm.md (the doc names these tests).

PyTorch claims are checked directly. Keras claims are checked by running Keras 3 on its *torch*
backend in a subprocess (no TensorFlow is imported anywhere: the subprocess asserts it), plus a
look at the Keras TF backend's source for the one thing that differs per backend (how moments are
computed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from converter import bn

KERAS_SPEC = importlib.util.find_spec("keras")  # a test dependency, located without importing it


def keras_root() -> Path:
    assert KERAS_SPEC is not None and KERAS_SPEC.submodule_search_locations
    return Path(list(KERAS_SPEC.submodule_search_locations)[0])


KERAS_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    out = {"backend": keras.backend.backend()}
    layer = keras.layers.BatchNormalization()
    out["defaults"] = {"momentum": layer.momentum, "epsilon": layer.epsilon}
    x = np.random.default_rng(0).normal(2, 3, size=(8, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x, training=True))
    out.update(x=x.tolist(), y_train=np.asarray(y).tolist(),
               moving_mean=np.asarray(keras.ops.convert_to_numpy(layer.moving_mean)).tolist(),
               moving_variance=np.asarray(keras.ops.convert_to_numpy(layer.moving_variance)).tolist())
    apps = {}
    for name in ("ResNet50", "DenseNet121", "EfficientNetB0", "MobileNetV2"):
        m = getattr(keras.applications, name)(weights=None, input_shape=(64, 64, 3), include_top=False)
        bns = [l for l in m.layers if isinstance(l, keras.layers.BatchNormalization)]
        apps[name] = {"eps": sorted({l.epsilon for l in bns}), "momentum": sorted({l.momentum for l in bns})}
    out["apps"] = apps
    out["tensorflow_imported"] = "tensorflow" in sys.modules
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def keras_probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    script = tmp_path_factory.mktemp("keras") / "probe.py"
    script.write_text(KERAS_PROBE)
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["backend"] == "torch" and not out["tensorflow_imported"]
    return out


def batch(n: int = 16, c: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.tensor([3.0, 0.5, 1.0, 2.0]) + torch.tensor([2.0, -1.0, 0.5, 10.0])


def fresh_bn(**kw: Any) -> nn.BatchNorm1d:
    m = nn.BatchNorm1d(4, affine=False, **kw)
    with torch.no_grad():
        m.running_mean.fill_(0.3)
        m.running_var.fill_(1.7)
    return m


# ------------------------------------------------------------------ momentum conventions


def test_pytorch_momentum_update_rule() -> None:
    """PyTorch: running = (1 - p) * running + p * batch."""
    m = fresh_bn(momentum=0.1).train()
    x = batch()
    m(x)
    assert torch.allclose(m.running_mean, 0.9 * 0.3 + 0.1 * x.mean(0), atol=1e-6)
    assert torch.allclose(m.running_var, 0.9 * 1.7 + 0.1 * x.var(0, unbiased=True), atol=1e-5)


def test_keras_momentum_update_rule(keras_probe: dict[str, Any]) -> None:
    """Keras: moving = m * moving + (1 - m) * batch, m = 0.99 by default, eps 1e-3."""
    assert keras_probe["defaults"] == {"momentum": 0.99, "epsilon": 0.001}
    x = torch.tensor(keras_probe["x"], dtype=torch.float64)
    assert torch.allclose(torch.tensor(keras_probe["moving_mean"], dtype=torch.float64),
                          0.99 * 0 + 0.01 * x.mean(0), atol=1e-6)


def test_keras_momentum_m_is_pytorch_1_minus_m() -> None:
    """With p = 1 - m a PyTorch BN follows the Keras moving mean exactly (the formula, batch by batch)."""
    m_keras = 0.99
    torch_bn = fresh_bn(momentum=bn.momentum_from_keras(m_keras)).train()
    moving = torch.full((4,), 0.3, dtype=torch.float64)
    for i in range(20):
        x = batch(seed=i)
        torch_bn(x)
        moving = m_keras * moving + (1 - m_keras) * x.double().mean(0)
    assert torch.allclose(torch_bn.running_mean.double(), moving, atol=1e-6)


def test_keras_momentum_pasted_into_pytorch_tracks_the_last_batch() -> None:
    """The MaxViT bug: momentum=0.99 in PyTorch puts 99% weight on each new batch."""
    m = fresh_bn(momentum=0.99).train()
    for i in range(5):
        m(batch(seed=i))
    last = batch(seed=4).mean(0)
    assert torch.allclose(m.running_mean, last, atol=0.05 * last.abs().max().item())
    assert [f.rule for f in bn.audit(nn.Sequential(m).eval())] == ["momentum-keras-convention"]


def test_torchvision_maxvit_momentum_is_fixed() -> None:
    """torchvision's MaxViT now uses momentum 0.01, eps 1e-3 (it shipped 0.99 until vision #8250)."""
    m = bn.resolve_model_spec("torchvision:maxvit_t")
    assert {(x.momentum, x.eps) for x in m.modules() if isinstance(x, nn.BatchNorm2d)} == {(0.01, 0.001)}


# ------------------------------------------------------------------ eps


def test_pytorch_defaults() -> None:
    """PyTorch BatchNorm defaults: eps 1e-5, momentum 0.1, affine, tracking running stats."""
    m = nn.BatchNorm2d(3)
    assert (m.eps, m.momentum, m.affine, m.track_running_stats) == (1e-5, 0.1, True, True)


def test_keras_application_eps(keras_probe: dict[str, Any]) -> None:
    """Keras ResNet/DenseNet use eps 1.001e-5; EfficientNet/MobileNetV2 keep 1e-3; MobileNetV2 momentum 0.999."""
    apps = keras_probe["apps"]
    assert apps["ResNet50"]["eps"] == [1.001e-5] and apps["DenseNet121"]["eps"] == [1.001e-5]
    assert apps["EfficientNetB0"]["eps"] == [0.001] and apps["MobileNetV2"]["eps"] == [0.001]
    assert apps["ResNet50"]["momentum"] == [0.99] and apps["MobileNetV2"]["momentum"] == [0.999]


def test_timm_tf_ports_keep_tf_eps() -> None:
    """timm's tf_* ports use eps 1e-3 with PyTorch momentum 0.1."""
    m = bn.resolve_model_spec("timm:tf_mobilenetv3_small_100")
    assert {(x.momentum, x.eps) for x in m.modules() if isinstance(x, nn.BatchNorm2d)} == {(0.1, 1e-3)}


def test_eps_matters_on_low_variance_channels() -> None:
    """A wrong eps changes eval outputs noticeably where running_var is small."""
    a, b = nn.BatchNorm1d(2, eps=1e-3).eval(), nn.BatchNorm1d(2, eps=1e-5).eval()
    for m in (a, b):
        m.running_var.copy_(torch.tensor([1.0, 1e-4]))
    x = torch.randn(8, 2) * torch.tensor([1.0, 1e-2])
    with torch.no_grad():
        ratio = a(x) / b(x)  # = sqrt(var + 1e-5) / sqrt(var + 1e-3) per channel
    assert torch.allclose(ratio[:, 0], torch.tensor((1 + 1e-5) / (1 + 1e-3)).sqrt(), atol=1e-6)  # 0.05 % off
    assert torch.allclose(ratio[:, 1], torch.tensor(1.1e-4 / 1.1e-3).sqrt(), atol=1e-4)  # outputs x0.32


# ------------------------------------------------------------------ biased vs unbiased


def test_pytorch_running_var_uses_unbiased_variance() -> None:
    """PyTorch updates running_var with the unbiased batch variance (n - 1)."""
    m = nn.BatchNorm1d(4, momentum=1.0).train()  # momentum 1: running_var = this batch's variance
    x = batch(n=5)
    m(x)
    unbiased = ((x - x.mean(0)) ** 2).sum(0) / (5 - 1)
    assert torch.allclose(m.running_var, unbiased, atol=1e-5)
    assert not torch.allclose(m.running_var, ((x - x.mean(0)) ** 2).mean(0), atol=1e-3)


def test_pytorch_normalizes_with_biased_variance() -> None:
    """In train mode PyTorch normalizes with the biased batch variance (n)."""
    m = nn.BatchNorm1d(4, affine=False, eps=1e-5).train()
    x = batch(n=5)
    biased = ((x - x.mean(0)) ** 2).mean(0)
    assert torch.allclose(m(x), (x - x.mean(0)) / torch.sqrt(biased + 1e-5), atol=1e-5)


def test_keras_moving_variance_uses_biased_variance(keras_probe: dict[str, Any]) -> None:
    """Keras updates moving_variance with the biased batch variance and normalizes with it too."""
    x = torch.tensor(keras_probe["x"], dtype=torch.float64)
    biased, unbiased = x.var(0, unbiased=False), x.var(0, unbiased=True)
    mv = torch.tensor(keras_probe["moving_variance"], dtype=torch.float64)
    assert torch.allclose(mv, 0.99 * 1 + 0.01 * biased, atol=1e-6)
    assert not torch.allclose(mv, 0.99 * 1 + 0.01 * unbiased, atol=1e-4)
    y = torch.tensor(keras_probe["y_train"], dtype=torch.float64)
    assert torch.allclose(y, (x - x.mean(0)) / torch.sqrt(biased + 1e-3), atol=1e-4)


def test_keras_tf_backend_moments_are_tf_nn_moments() -> None:
    """The TF backend (what TF checkpoints were trained with) computes moments with tf.nn.moments,
    the biased (population) variance, like the torch backend checked above."""
    src = (keras_root() / "src" / "backend" / "tensorflow" / "nn.py").read_text()
    body = src[src.index("def _compute_moments(") :].split("\ndef ", 1)[0]
    assert "tf.nn.moments(" in body
    bn_src = (keras_root() / "src" / "layers" / "normalization" / "batch_normalization.py").read_text()
    flat = re.sub(r"\s+", "", bn_src)
    assert "moving_variance*self.momentum+variance*(1.0-self.momentum)" in flat


def test_bessel_factor_between_the_conventions() -> None:
    """Per batch of n, PyTorch's variance update is n/(n-1) times Keras'; negligible for large batches."""
    x = batch(n=8)
    ratio = x.var(0, unbiased=True) / x.var(0, unbiased=False)
    assert torch.allclose(ratio, torch.full((4,), 8 / 7), atol=1e-5)


# ------------------------------------------------------------------ train/eval x track_running_stats


def test_train_tracking_uses_batch_stats_and_updates() -> None:
    m = fresh_bn().train()
    x = batch()
    y = m(x)
    assert torch.allclose(y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), atol=1e-5)
    assert not torch.allclose(m.running_mean, torch.full((4,), 0.3)) and int(m.num_batches_tracked) == 1


def test_eval_tracking_uses_running_stats_without_update() -> None:
    m = fresh_bn().eval()
    x = batch()
    y = m(x)
    assert torch.allclose(y, (x - 0.3) / torch.sqrt(torch.tensor(1.7) + 1e-5), atol=1e-5)
    assert torch.allclose(m.running_mean, torch.full((4,), 0.3)) and int(m.num_batches_tracked) == 0


def test_train_not_tracking_has_no_buffers() -> None:
    m = nn.BatchNorm1d(4, affine=False, track_running_stats=False).train()
    x = batch()
    y = m(x)
    assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    assert torch.allclose(y, (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5), atol=1e-5)


def test_eval_not_tracking_depends_on_batch_composition() -> None:
    """track_running_stats=False: eval normalizes with the batch's own stats, so the same sample
    gives different outputs in different batches (and batch size 1 fails for BatchNorm1d)."""
    m = nn.BatchNorm1d(4, track_running_stats=False).eval()
    x = batch(n=8)
    alone = m(x[:4])[0]
    mixed = m(torch.cat([x[:1], x[4:] * 5]))[0]
    assert not torch.allclose(alone, mixed, atol=1e-2)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(x[:1])


def test_track_running_stats_toggled_after_construction() -> None:
    """Setting track_running_stats=False on a built module: eval still uses the old buffers, train
    mode normalizes with batch stats and never updates them."""
    m = fresh_bn()
    m.track_running_stats = False
    x = batch()
    m.train()(x)
    assert torch.allclose(m.running_mean, torch.full((4,), 0.3))
    y = m.eval()(x)
    assert torch.allclose(y, (x - 0.3) / torch.sqrt(torch.tensor(1.7) + 1e-5), atol=1e-5)


def test_no_grad_does_not_stop_running_stat_updates() -> None:
    """torch.no_grad() is not eval(): a train-mode forward under no_grad still updates the stats."""
    m = fresh_bn().train()
    with torch.no_grad():
        m(batch())
    assert int(m.num_batches_tracked) == 1 and not torch.allclose(m.running_mean, torch.full((4,), 0.3))


def test_momentum_none_is_cumulative_average() -> None:
    """momentum=None: running stats are the plain average over batches since the last reset."""
    m = nn.BatchNorm1d(4, momentum=None).train()
    xs = [batch(seed=i) for i in range(10)]
    for x in xs:
        m(x)
    assert torch.allclose(m.running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), atol=1e-5)
    assert torch.allclose(m.running_var, torch.stack([x.var(0) for x in xs]).mean(0), atol=1e-4)


def test_momentum_none_first_batch_overwrites_loaded_stats() -> None:
    """momentum=None with num_batches_tracked=0: the first train batch replaces loaded stats."""
    m = fresh_bn(momentum=None).train()
    x = batch()
    m(x)
    assert torch.allclose(m.running_mean, x.mean(0), atol=1e-6)


# ------------------------------------------------------------------ precise BN, frozen BN, other layers


def test_precise_bn_is_the_mean_of_batch_statistics() -> None:
    xs = [batch(seed=i) for i in range(12)]
    m = nn.Sequential(nn.BatchNorm1d(4))
    bn.recalibrate(m, xs, 12)
    assert torch.allclose(m[0].running_mean, torch.stack([x.mean(0) for x in xs]).mean(0), atol=1e-5)
    assert torch.allclose(m[0].running_var, torch.stack([x.var(0) for x in xs]).mean(0), atol=1e-4)
    assert m[0].momentum == 0.1


def test_sorted_batches_underestimate_the_variance() -> None:
    """Precise BN averages within-batch variances: class-sorted batches miss the between-batch part."""
    g = torch.Generator().manual_seed(0)
    data = torch.cat([torch.randn(256, 1, generator=g) - 3, torch.randn(256, 1, generator=g) + 3])  # var ~ 10
    sorted_ = nn.Sequential(nn.BatchNorm1d(1))
    bn.recalibrate(sorted_, list(data.split(32)), 16)
    shuffled = nn.Sequential(nn.BatchNorm1d(1))
    bn.recalibrate(shuffled, list(data[torch.randperm(512, generator=g)].split(32)), 16)
    assert sorted_[0].running_var.item() < 1.5 < 8 < shuffled[0].running_var.item()


def test_model_train_undoes_eval_on_bn_modules_but_not_freeze() -> None:
    """bn.eval() alone is undone by the next model.train(); bn.freeze survives it."""
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    net[1].eval()
    net.train()
    assert net[1].training
    bn.freeze(net).train()
    before = net[1].running_mean.clone()
    net(batch())
    assert torch.equal(before, net[1].running_mean)


def test_timm_batchnormact_is_a_batchnorm() -> None:
    """timm's BatchNormAct2d subclasses BatchNorm2d, so audit/recalibrate/freeze handle it."""
    from timm.layers import BatchNormAct2d

    assert issubclass(BatchNormAct2d, nn.BatchNorm2d)


def test_other_stateful_layers_change_in_train_mode_and_recalibrate_leaves_them() -> None:
    """InstanceNorm(track_running_stats=True) and custom EMA buffers also change in a train-mode
    forward; recalibrate keeps them in eval, so only BatchNorm statistics move."""

    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("avg", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                self.avg.mul_(0.9).add_(0.1 * x.mean(0).detach().flatten()[:4])
            return x

    inorm = nn.InstanceNorm1d(4, track_running_stats=True)
    x = torch.randn(8, 4, 6) + 2
    inorm.train()(x)
    assert not torch.allclose(inorm.running_mean, torch.zeros(4))

    net = nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True), Ema(), nn.BatchNorm1d(4))
    net(x)  # train mode: everything moves
    state = {k: v.clone() for k, v in net.state_dict().items()}
    bn.recalibrate(net, [x] * 3, 3)
    for k in ("0.running_mean", "0.running_var", "1.avg"):
        assert torch.equal(state[k], net.state_dict()[k]), k
    assert not torch.equal(state["2.running_mean"], net.state_dict()["2.running_mean"])


def test_lazy_batchnorm_materializes_on_first_forward() -> None:
    """LazyBatchNorm has no stats until the first forward; recalibrate asks for one first."""
    m = nn.Sequential(nn.LazyBatchNorm1d())
    with pytest.raises(Exception, match="lazy BatchNorm"):
        bn.recalibrate(m, [batch()], 1)
    m.eval()(batch())
    assert m[0].running_mean.shape == (4,)


# ------------------------------------------------------------------ heads


def test_timm_bare_linear_attribute_is_ignored() -> None:
    """Assigning model.fc = nn.Linear(...) on a timm model whose head is elsewhere does nothing."""
    import timm

    m = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    m.fc = nn.Linear(1024, 10)  # wrong attribute for this architecture: silently unused
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_reset_classifier_replaces_the_head_the_architecture_way() -> None:
    """timm's reset_classifier swaps the right module and keeps the pooling/pre-logits intact."""
    import timm

    m = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    conv_head = m.conv_head.weight.clone()
    m.reset_classifier(10)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert m.get_classifier().out_features == 10 and torch.equal(conv_head, m.conv_head.weight)
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 1024)  # pooled pre-logits features


def test_torchvision_heads_live_in_different_places() -> None:
    """torchvision has no reset_classifier: resnet's head is .fc, MobileNetV3's .classifier[-1]."""
    r = bn.resolve_model_spec("torchvision:resnet18")
    r.fc = nn.Linear(r.fc.in_features, 10)
    assert r(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    mb = bn.resolve_model_spec("torchvision:mobilenet_v3_small")
    assert not hasattr(mb, "fc")
    mb.classifier[-1] = nn.Linear(mb.classifier[-1].in_features, 10)
    assert mb(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert isinstance(mb.classifier[2], nn.Dropout)  # the rest of the head is kept


def test_ao_observers_update_on_every_forward() -> None:
    """torch.ao quantization observers record min/max on every forward, train or eval, so a
    recalibration pass through a model with observers also moves their ranges."""
    from torch.ao.quantization import MinMaxObserver

    obs = MinMaxObserver().eval()
    obs(torch.tensor([-2.0, 3.0]))
    assert (obs.min_val.item(), obs.max_val.item()) == (-2.0, 3.0)
