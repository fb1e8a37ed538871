"""Rebuild the Keras model a file's stored config describes, never executing model code. Keras side
of verification only (imported by ``converter.keras_runner``, in its own process).

A ``.keras`` config goes through Keras' deserializer; a legacy ``.h5`` config
(``model.save("x.h5")`` in Keras 2 or 3) the way Keras' own legacy loader reads it
(keras/src/legacy/saving: the legacy config scope and ``saving_utils.model_from_config``, which also
knows Keras 2.0-2.2's ``Model``), both in Keras' safe mode. Before that every layer is checked: a
layer that runs stored Python code or TensorFlow ops (Lambda, TFOpLambda) or a class Keras does not
ship is refused, naming the layer.

One gap of Keras' legacy loader is filled: Keras 3 writes a functional op (``x + 3.0`` in
MobileNetV3) to a legacy config without the module a ``.keras`` config records, so the legacy loader
takes ``Add`` for the merge layer and fails (Keras 3.15's ``load_model`` cannot reload such a file).
An entry without ``trainable`` (every layer config has it, an op's never) that names a Keras op
class gets that class's module, as a ``.keras`` config records it.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any, Iterator

from .errors import UnsupportedLayerError, VerificationError
from .keras_graph import MODEL_CLASSES

# layers that run code stored in the file (marshalled Python, TF ops) or load other files
CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda", "TFSMLayer")
OP_MODULES = ("numpy", "nn", "math", "core", "image", "linalg", "einops")  # keras.src.ops.*
WRAPPED_KEYS = ("layer", "forward_layer", "backward_layer")  # TimeDistributed, Bidirectional


def rebuild(model_config: dict[str, Any], label: Path):
    """The Keras model of a stored config (weights left at their initial values)."""
    config = copy.deepcopy(model_config)
    legacy = "module" not in config
    for entry in (config, *layer_entries(config)):
        _check_layer(entry, legacy, label)
    if legacy:
        for model in (config, *layer_entries(config)):
            shift_nested_model_nodes(model)
    try:
        return _deserialize(config, legacy)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise VerificationError(
            f"{label}: Keras cannot rebuild the stored model config:"
            f" {reason[:300]}{'...' if len(reason) > 300 else ''}"
        ) from None


def layer_entries(config: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every layer entry of a model config: nested models' layers and wrapped layers included."""
    cfg = config.get("config")
    for entry in cfg.get("layers", []) if isinstance(cfg, dict) else cfg or []:
        yield entry
        yield from _inner_entries(entry)


def _inner_entries(entry: dict[str, Any]) -> Iterator[dict[str, Any]]:
    cfg = entry.get("config")
    if not isinstance(cfg, dict):
        return
    if "layers" in cfg:
        yield from layer_entries(entry)
    for key in WRAPPED_KEYS:
        if isinstance(cfg.get(key), dict) and "class_name" in cfg[key]:
            yield cfg[key]
            yield from _inner_entries(cfg[key])


def _check_layer(entry: dict[str, Any], legacy: bool, label: Path) -> None:
    """Refuse code-running and unknown layers; give a legacy op entry its module (in place)."""
    cls = entry.get("class_name", "")
    name = entry.get("name") or (entry.get("config") or {}).get("name") or "?"
    where = f"{label}: layer {name!r} ({cls})"
    if cls in CODE_LAYERS:
        raise UnsupportedLayerError(
            f"{where} runs code stored in the model, which ckptport never executes; pass"
            " --source-model module:function that builds the model"
        )
    if not legacy:
        known = str(entry.get("module", "")).split(".")[0] == "keras"
    elif _is_op_entry(entry) and (module := _op_module(cls)):
        entry["module"], entry["registered_name"] = module, cls
        known = True
    else:
        known = cls in MODEL_CLASSES or _is_keras_layer(cls)
    if not known:
        raise UnsupportedLayerError(
            f"{where} is not a Keras class (a custom layer?); ckptport does not import model code:"
            " pass --source-model module:function that builds the model"
        )


def shift_nested_model_nodes(model: dict[str, Any]) -> None:
    """Keras 2 counts a nested model's own construction as its node 0, so the first call of a nested
    model is node 1 in a Keras 2 config; Keras 3's legacy loader looks for it at index 0 and fails
    ("disconnected nodes"). References past a nested model's listed calls are shifted down by one
    (in place); tf.keras 2.x SavedModels and .h5 files with a nested model need it."""
    cfg = model.get("config")
    entries = cfg.get("layers", []) if isinstance(cfg, dict) else []
    calls = {
        e.get("name") or (e.get("config") or {}).get("name"): len(e.get("inbound_nodes") or [])
        for e in entries
        if isinstance(e.get("config"), dict) and "layers" in e["config"]
    }
    if not calls:
        return
    for ref in _node_refs([e.get("inbound_nodes") for e in entries] + [cfg.get("output_layers")]):
        if ref[0] in calls and ref[1] >= 1 and ref[1] >= calls[ref[0]]:
            ref[1] -= 1


def _node_refs(value: Any) -> Iterator[list]:
    """Every Keras 2 ``[layer name, node index, tensor index, ...]`` list inside ``value``."""
    if isinstance(value, list):
        if len(value) >= 3 and isinstance(value[0], str) and isinstance(value[1], int):
            yield value
            return
        for v in value:
            yield from _node_refs(v)


def _is_op_entry(entry: dict[str, Any]) -> bool:
    """Keras 3 op entries have no ``trainable`` (layers of every Keras version have one, models and
    input layers aside)."""
    cfg = entry.get("config")
    if not isinstance(cfg, dict) or "trainable" in cfg or "layers" in cfg:
        return False
    return entry.get("class_name") not in (*MODEL_CLASSES, "InputLayer")


def _op_module(cls: str) -> str | None:
    from keras.src.ops.operation import Operation

    for short in OP_MODULES:
        module = importlib.import_module(f"keras.src.ops.{short}")
        found = getattr(module, cls, None)
        if isinstance(found, type) and issubclass(found, Operation):
            return module.__name__
    return None


def _is_keras_layer(cls: str) -> bool:
    from keras.src import layers

    found = getattr(layers, cls, None)
    return isinstance(found, type) and issubclass(found, layers.Layer)


def _deserialize(config: dict[str, Any], legacy: bool):
    """Keras' own deserializers, in safe mode (no marshalled code is ever loaded)."""
    from keras.src.saving import serialization_lib

    with serialization_lib.SafeModeScope(True):
        if not legacy:
            return serialization_lib.deserialize_keras_object(config)
        from keras.src.legacy.saving import saving_options, saving_utils

        with saving_options.keras_option_scope(use_legacy_config=True):
            return saving_utils.model_from_config(config)
