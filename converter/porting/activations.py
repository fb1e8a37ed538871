"""Keras activations and their PyTorch twins: the module a Keras ``Activation`` layer becomes
and the function a layer's fused ``activation=`` becomes. ``{x}`` is the input, ``{dim}`` the
channel dim."""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import Registry


@dataclass(frozen=True)
class Activation:
    module: str | None  # nn module for an Activation layer (None: written in forward)
    function: str  # the forward expression


ACTIVATIONS: Registry[Activation] = Registry("Keras activation with a PyTorch twin")

for _names, _module, _function in (
    (("linear",), "nn.Identity()", "{x}"),
    (("relu",), "nn.ReLU()", "F.relu({x})"),
    (("relu6",), "nn.ReLU6()", "F.relu6({x})"),
    (("sigmoid",), "nn.Sigmoid()", "torch.sigmoid({x})"),
    (("tanh",), "nn.Tanh()", "torch.tanh({x})"),
    (("softmax",), "nn.Softmax(dim={dim})", "F.softmax({x}, dim={dim})"),
    (("log_softmax",), "nn.LogSoftmax(dim={dim})", "F.log_softmax({x}, dim={dim})"),
    (("swish", "silu"), "nn.SiLU()", "F.silu({x})"),
    (("gelu",), "nn.GELU()", "F.gelu({x})"),
    (("elu",), "nn.ELU()", "F.elu({x})"),
    (("selu",), "nn.SELU()", "F.selu({x})"),
    (("celu",), "nn.CELU()", "F.celu({x})"),
    (("softplus",), "nn.Softplus()", "F.softplus({x})"),
    (("softsign",), "nn.Softsign()", "F.softsign({x})"),
    (("hard_sigmoid",), "nn.Hardsigmoid()", "F.hardsigmoid({x})"),
    (("hard_silu", "hard_swish"), "nn.Hardswish()", "F.hardswish({x})"),
    (("hard_tanh",), "nn.Hardtanh()", "F.hardtanh({x})"),
    (("mish",), "nn.Mish()", "F.mish({x})"),
    (("leaky_relu",), "nn.LeakyReLU(0.2)", "F.leaky_relu({x}, 0.2)"),
    (("log_sigmoid",), "nn.LogSigmoid()", "F.logsigmoid({x})"),
    (("tanh_shrink",), "nn.Tanhshrink()", "F.tanhshrink({x})"),
    (("soft_shrink",), "nn.Softshrink(0.5)", "F.softshrink({x}, 0.5)"),
    (("hard_shrink",), "nn.Hardshrink(0.5)", "F.hardshrink({x}, 0.5)"),
    (("exponential",), None, "torch.exp({x})"),
):
    for _name in _names:
        ACTIVATIONS.add(_name, Activation(_module, _function))


def activation_name(value: object) -> str | None:
    """The activation a config names (Keras 3 may write a serialized function dict); None for a
    custom one."""
    if value is None:
        return "linear"
    if isinstance(value, dict):
        value = (value.get("config") or {}).get("name") or value.get("class_name")
    if isinstance(value, str) and value in ACTIVATIONS:
        return value
    return None
