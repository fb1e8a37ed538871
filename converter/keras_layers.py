"""What each Keras layer class stores, in Keras save order (trainable first, then non-trainable).

Formats that number variables (``.weights.h5``: ``vars/0``; SavedModel: ``variables/<i>``) need this
to name them; formats that name them (legacy ``.h5``, TF object checkpoints) use ``aliases`` to map
attribute names (``_kernel``) to variable names (``kernel``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .registry import Registry


@dataclass(frozen=True)
class LayerVars:
    """``names``: the variables in save order; ``subs``: a sublayer's path in a ``.weights.h5``
    group (``cell``, ``forward_layer/cell``) -> the prefix of its variables' names."""

    names: Callable[[dict[str, Any]], list[str]]
    aliases: dict[str, str] = field(default_factory=dict)
    subs: dict[str, str] = field(default_factory=dict)


KERAS_LAYERS: Registry[LayerVars] = Registry("Keras layer class")


def _kernel_bias(kernel: str = "kernel") -> Callable[[dict[str, Any]], list[str]]:
    return lambda c: [kernel] + (["bias"] if c.get("use_bias", True) else [])


_SLIM = {"weights": "kernel", "biases": "bias"}  # TF-slim's names (TF1 checkpoints)
for _cls in (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "Dense",
):
    KERAS_LAYERS.add(_cls, LayerVars(_kernel_bias(), {"_kernel": "kernel", **_SLIM}))
_DEPTHWISE = {"_kernel": "kernel", "depthwise_kernel": "kernel", "depthwise_weights": "kernel"}
for _cls in ("DepthwiseConv1D", "DepthwiseConv2D"):
    KERAS_LAYERS.add(_cls, LayerVars(_kernel_bias(), {**_DEPTHWISE, **_SLIM}))
for _cls in ("SeparableConv1D", "SeparableConv2D"):
    KERAS_LAYERS.add(
        _cls,
        LayerVars(
            lambda c: ["depthwise_kernel", "pointwise_kernel"]
            + (["bias"] if c.get("use_bias", True) else [])
        ),
    )
KERAS_LAYERS.add("Embedding", LayerVars(lambda c: ["embeddings"]))
KERAS_LAYERS.add("PReLU", LayerVars(lambda c: ["alpha"]))


def _rnn_vars(c: dict[str, Any]) -> list[str]:
    return ["kernel", "recurrent_kernel"] + (["bias"] if c.get("use_bias", True) else [])


# recurrent layers keep their variables in a ``cell`` sublayer
for _cls in ("LSTM", "GRU", "SimpleRNN"):
    KERAS_LAYERS.add(_cls, LayerVars(_rnn_vars, subs={"cell": ""}))


def _bidirectional_vars(c: dict[str, Any]) -> list[str]:
    inner = c.get("layer", {}).get("config", {})
    return [f"{d}/{v}" for d in ("forward", "backward") for v in _rnn_vars(inner)]


KERAS_LAYERS.add(
    "Bidirectional",
    LayerVars(
        _bidirectional_vars,
        subs={"forward_layer/cell": "forward/", "backward_layer/cell": "backward/"},
    ),
)


def _bn_vars(c: dict[str, Any]) -> list[str]:
    names = (["gamma"] if c.get("scale", True) else []) + (
        ["beta"] if c.get("center", True) else []
    )
    return names + ["moving_mean", "moving_variance"]


KERAS_LAYERS.add("BatchNormalization", LayerVars(_bn_vars))
KERAS_LAYERS.add(
    "LayerNormalization",
    LayerVars(
        lambda c: (["gamma"] if c.get("scale", True) else [])
        + (["beta"] if c.get("center", True) else [])
    ),
)


def _norm_vars(c: dict[str, Any]) -> list[str]:
    return [] if c.get("mean") is not None else ["mean", "variance", "count"]


KERAS_LAYERS.add(
    "Normalization",
    LayerVars(_norm_vars, {"adapt_mean": "mean", "adapt_variance": "variance"}),
)
# keras.applications ConvNeXt's LayerScale (Keras 3) adds its one weight without a name; TF object
# checkpoints key it by the attribute holding it (``gamma``)
KERAS_LAYERS.add("LayerScale", LayerVars(lambda c: ["variable"], {"gamma": "variable"}))


def var_names(class_name: str, config: dict[str, Any], n_found: int) -> list[str] | None:
    """Variable names of a layer in save order, or None for a class we do not know."""
    if class_name not in KERAS_LAYERS:
        return None
    names = KERAS_LAYERS.get(class_name).names(config)
    return names if len(names) == n_found else None


def sub_var_name(class_name: str, config: dict[str, Any], sub: str, index: int) -> str | None:
    """The name of variable ``index`` of sublayer ``sub`` (a ``.weights.h5`` path such as
    ``cell`` or ``forward_layer/cell``), or None when the class has no such sublayer."""
    if class_name not in KERAS_LAYERS:
        return None
    spec = KERAS_LAYERS.get(class_name)
    if sub not in spec.subs:
        return None
    prefix = spec.subs[sub]
    names = [n for n in spec.names(config) if n.startswith(prefix) and "/" not in n[len(prefix) :]]
    return names[index] if index < len(names) else None


def canonical_attr(class_name: str, attr: str) -> str:
    """TF checkpoint attribute name -> Keras variable name (``_kernel`` -> ``kernel``)."""
    if class_name in KERAS_LAYERS:
        attr = KERAS_LAYERS.get(class_name).aliases.get(attr, attr)
    return attr.lstrip("_")


# ckptport port keeps GroupNormalization as torch GroupNorm (gamma, beta like LayerNormalization)
KERAS_LAYERS.add(
    "GroupNormalization",
    LayerVars(
        lambda c: (["gamma"] if c.get("scale", True) else [])
        + (["beta"] if c.get("center", True) else [])
    ),
)
