"""Preprocessing layers a table drops with ``as = "preprocessing"`` (Keras ``Rescaling``,
``Normalization``): not weights of the target, so they are recorded instead, composed into one
per-channel affine map ``x_torch = x * scale + offset`` on what the Keras model received.

Each supported layer class is one entry of ``PREPROCESSING``: a function that takes the layer and
the map so far and returns the map with the layer applied after it, plus the step to record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import InvalidTensorError, MappingError, UnsupportedLayerError
from .ledger import check_finite
from .registry import Registry
from .source import SourceLayer

FORMULA = "x_torch = x * scale + offset, per channel, on the input the Keras model received"


@dataclass(frozen=True)
class Affine:
    """The per-channel map ``x -> x * scale + offset`` (float64; length 1 broadcasts)."""

    scale: np.ndarray
    offset: np.ndarray

    @classmethod
    def identity(cls) -> Affine:
        return cls(np.ones(1, np.float64), np.zeros(1, np.float64))


#: layer, the map before it -> (the map including it, the step recorded in the metadata)
PreprocessingStep = Callable[[SourceLayer, Affine], tuple[Affine, dict[str, Any]]]
PREPROCESSING: Registry[PreprocessingStep] = Registry("preprocessing layer")


@PREPROCESSING.register("Rescaling")
def rescaling(layer: SourceLayer, before: Affine) -> tuple[Affine, dict[str, Any]]:
    """``x * scale + offset`` (Keras ``Rescaling``; scalars or per channel)."""
    scale = np.asarray(layer.config.get("scale", 1.0), np.float64).reshape(-1)
    offset = np.asarray(layer.config.get("offset", 0.0), np.float64).reshape(-1)
    after = Affine(before.scale * scale, before.offset * scale + offset)
    step = {
        "layer": layer.name,
        "op": "rescale",
        "scale": scale.tolist(),
        "offset": offset.tolist(),
    }
    return after, step


@PREPROCESSING.register("Normalization")
def normalization(layer: SourceLayer, before: Affine) -> tuple[Affine, dict[str, Any]]:
    """``(x - mean) / max(sqrt(variance), 1e-7)`` (Keras ``Normalization``, adapted or given)."""
    mean, variance = _mean_and_variance(layer)
    check_finite(mean, f"layer {layer.name!r} mean")
    if (variance < 0).any():
        raise InvalidTensorError(f"layer {layer.name!r} (Normalization) has a negative variance")
    std = np.maximum(np.sqrt(variance.reshape(-1)), 1e-7)  # keras: max(sqrt(var), epsilon)
    mean = mean.reshape(-1)
    if layer.config.get("invert"):
        raise UnsupportedLayerError(
            f"layer {layer.name!r}: Normalization(invert=True) is not supported"
        )
    after = Affine(before.scale / std, (before.offset - mean) / std)
    step = {"layer": layer.name, "op": "normalize", "mean": mean.tolist(), "std": std.tolist()}
    return after, step


def _mean_and_variance(layer: SourceLayer) -> tuple[np.ndarray, np.ndarray]:
    """Adapted statistics are variables; statistics given to the constructor are config."""
    if "mean" in layer.weights:
        return layer.load("mean").astype(np.float64), layer.load("variance").astype(np.float64)
    return (
        np.asarray(layer.config["mean"], np.float64),
        np.asarray(layer.config["variance"], np.float64),
    )


def preprocessing_step(layer: SourceLayer) -> PreprocessingStep:
    """The registered step for ``layer``'s class, or a MappingError saying what can be recorded."""
    if layer.class_name not in PREPROCESSING:
        raise MappingError(
            f"layer {layer.name!r} ({layer.class_name}) is dropped as preprocessing, but ckptport "
            f"records only {', '.join(PREPROCESSING)}; map it or drop it with as='ignore'"
        )
    return PREPROCESSING.get(layer.class_name)


def preprocessing_spec(layers: list[SourceLayer]) -> dict[str, Any]:
    """Compose the dropped preprocessing ``layers``, in model order, into one affine map."""
    affine = Affine.identity()
    steps: list[dict[str, Any]] = []
    for layer in layers:
        affine, step = preprocessing_step(layer)(layer, affine)
        steps.append(step)
    return {
        "steps": steps,
        "scale": affine.scale.tolist(),
        "offset": affine.offset.tolist(),
        "formula": FORMULA,
    }
