"""converter.bn.freeze / unfreeze and the momentum convention helpers."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

from converter import bn
from converter.errors import ConverterError


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    with torch.no_grad():  # non-trivial stats and affine params, as after a conversion
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def bn_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net[1].state_dict().items()}


def train_step(net: nn.Module) -> None:
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5, momentum=0.9, weight_decay=0.1)
    x = torch.randn(16, 3, 8, 8) * 3 + 2
    y = torch.randint(0, 2, (16,))
    net.train()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


def test_frozen_bn_survives_train_and_an_optimizer_step() -> None:
    net = bn.freeze(small_net())
    before, conv_before = bn_state(net), net[0].weight.detach().clone()
    train_step(net)
    after = bn_state(net)
    assert all(torch.equal(before[k], after[k]) for k in before), "BN stats/affine changed"
    assert not torch.equal(conv_before, net[0].weight), "conv weight should have trained"
    assert not net[1].weight.requires_grad and not net[1].bias.requires_grad


def test_without_freeze_the_same_step_changes_bn() -> None:
    net = small_net()
    before = bn_state(net)
    train_step(net)
    after = bn_state(net)
    assert not torch.equal(before["running_mean"], after["running_mean"])
    assert not torch.equal(before["weight"], after["weight"])


def test_frozen_bn_normalizes_with_running_stats_in_train_mode() -> None:
    net = small_net()
    x = torch.randn(4, 3, 8, 8) * 3 + 2
    ref = net.eval()(x)
    bn.freeze(net).train()
    assert net.training
    assert torch.allclose(net(x), ref, atol=1e-6)


def test_freeze_is_idempotent_and_unfreeze_restores() -> None:
    net = small_net()
    net[1].bias.requires_grad_(False)  # a user's own choice must survive freeze/unfreeze
    bn.freeze(bn.freeze(net))
    assert len(net[1]._forward_pre_hooks) == 1 and bn.is_frozen(net[1])
    net.train()
    bn.unfreeze(net)
    assert not bn.is_frozen(net[1]) and len(net[1]._forward_pre_hooks) == 0
    assert net[1].training and net[1].weight.requires_grad and not net[1].bias.requires_grad
    before = net[1].running_mean.clone()
    net(torch.randn(4, 3, 8, 8) + 5)
    assert not torch.equal(before, net[1].running_mean)


def test_frozen_survives_deepcopy_and_pickle() -> None:
    net = bn.freeze(small_net())
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        clone.train()
        before = clone[1].running_mean.clone()
        clone(torch.randn(4, 3, 8, 8) + 5)
        assert torch.equal(before, clone[1].running_mean)
        assert bn.is_frozen(clone[1]) and not clone[1].weight.requires_grad
        bn.unfreeze(clone)
        assert clone[1].weight.requires_grad


def test_freeze_covers_subclasses_and_leaves_other_layers() -> None:
    from timm.layers import BatchNormAct2d

    net = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4), nn.Dropout(0.5), nn.SyncBatchNorm(4))
    bn.freeze(net).train()
    assert bn.is_frozen(net[1]) and bn.is_frozen(net[3]) and not bn.is_frozen(net[0])
    assert net[2].training  # dropout untouched
    net(torch.randn(2, 3, 4, 4))
    assert not net[1].training and not net[3].training  # switched to eval by the hook
    assert int(net[1].num_batches_tracked) == 0


# ------------------------------------------------------------------ momentum conventions


@pytest.mark.parametrize("keras,torch_", [(0.99, 0.01), (0.9, 0.1), (0.9997, 0.0003), (0.999, 0.001), (0.5, 0.5)])
def test_momentum_conversion(keras: float, torch_: float) -> None:
    assert bn.momentum_from_keras(keras) == torch_
    assert bn.from_keras(keras) == torch_
    assert bn.momentum_to_keras(torch_) == keras
    assert bn.to_keras(torch_) == keras
    assert math.isclose(bn.to_keras(bn.from_keras(keras)), keras, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [0, 1, 0.0, 1.0, 1.5, -0.1, float("nan"), float("inf"), "0.9", True, None])
def test_momentum_range_errors(bad: object) -> None:
    with pytest.raises(ConverterError, match=r"momentum"):
        bn.momentum_from_keras(bad)  # type: ignore[arg-type]
    with pytest.raises(ConverterError, match=r"momentum"):
        bn.momentum_to_keras(bad)  # type: ignore[arg-type]


def test_momentum_error_messages_are_clear() -> None:
    with pytest.raises(ConverterError, match=r"Keras momentum must be in \(0, 1\) \(exclusive\), got 1.5"):
        bn.momentum_from_keras(1.5)
    with pytest.raises(ConverterError, match="cumulative average.*no Keras equivalent"):
        bn.momentum_to_keras(None)  # type: ignore[arg-type]
