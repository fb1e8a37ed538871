"""Layer manifests: what a source architecture looks like (Keras side) and what a target expects
(PyTorch side: keys, shapes, BN settings), shipped as JSON under ``mappings/manifests``.

Source manifest (``keras.<id>.json``)::

    {"schema": 1, "id": "keras:EfficientNetB0", "framework": "keras", "keras_version": "3.15.1",
     "build": {"fn": "EfficientNetB0", "kwargs": {"weights": null, ...}},
     "layers": [{"name": "stem_conv", "class_name": "Conv2D", "config": {...},
                 "vars": [{"name": "kernel", "shape": [3, 3, 3, 32], "dtype": "float32"}]}, ...]}

``layers`` is ``model.layers`` in order, ``vars`` each layer's variables in Keras save order
(trainable first), ``op_index`` the layer's index in ``model._operations`` (what TF object
checkpoints call ``_operations/<i>``: raw ops such as ``x + 3`` count too). ``flat_variables`` is
``model.variables`` in order (SavedModel ``variables/<i>``) as ``[layer index, var name]``, with
``[-1, path]`` for state that is no layer's weight (Dropout seed generators).

Target manifest (``timm.tf_efficientnet_b0.json``)::

    {"schema": 1, "id": "timm:tf_efficientnet_b0", "library": "timm", "library_version": "1.0.29",
     "name": "tf_efficientnet_b0", "kwargs": {},
     "tensors": [{"key": "conv_stem.weight", "shape": [32, 3, 3, 3], "dtype": "float32"}, ...],
     "bn_modules": {"bn1": {"eps": 0.001, "momentum": 0.1, "affine": true,
                            "track_running_stats": true}, ...}}
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from .errors import MappingError

SCHEMA = 1
_DROP_CONFIG = re.compile(r"_(initializer|regularizer|constraint)$")


def slug(manifest_id: str) -> str:
    """File stem for a manifest id: ``keras:MobileNetV3Small(alpha=0.75)`` ->
    ``keras.MobileNetV3Small.alpha0.75``."""
    s = manifest_id.replace(":", ".").replace("(", ".").replace(")", "").replace("=", "")
    s = s.replace(",", ".").replace(" ", "")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def manifest_dir() -> Path:
    return Path(str(resources.files("converter.mappings") / "manifests"))


def manifest_path(manifest_id: str) -> Path:
    return manifest_dir() / f"{slug(manifest_id)}.json"


@lru_cache(maxsize=None)
def load_manifest(manifest_id: str) -> dict[str, Any]:
    """Load a shipped manifest by id; a miss names the file and how to regenerate."""
    path = manifest_path(manifest_id)
    if not path.is_file():
        raise MappingError(
            f"no manifest for {manifest_id!r} (expected {path}); regenerate with `make manifests`"
        )
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA or data.get("id") != manifest_id:
        raise MappingError(
            f"manifest {path} is not schema {SCHEMA} for {manifest_id!r}; run `make manifests`"
        )
    return data


INDEX_FILE = "index.json"  # every source manifest's weighted layers and variable shapes


def weighted_layers(man: Mapping[str, Any]) -> list[tuple[str, list[tuple[int, ...]]]]:
    """A source manifest's layers that hold variables: (name, each variable's shape)."""
    if isinstance(man, LazyManifest):
        return man.weighted
    return [
        (lay["name"], [tuple(v["shape"]) for v in lay["vars"]])
        for lay in man["layers"]
        if lay["vars"]
    ]


class LazyManifest(Mapping):
    """A shipped source manifest known by its id and weighted-layer shapes (from the index), read
    whole only when something else of it is asked for: detection rules most architectures out by
    shapes alone, so most manifests are never parsed (11 MB of JSON for the shipped ones)."""

    def __init__(self, manifest_id: str, weighted: list[list[Any]]) -> None:
        self.id = manifest_id
        self.weighted = [(name, [tuple(s) for s in shapes]) for name, shapes in weighted]

    def __getitem__(self, key: str) -> Any:
        return self.id if key == "id" else load_manifest(self.id)[key]

    def __iter__(self):
        return iter(load_manifest(self.id))

    def __len__(self) -> int:
        return len(load_manifest(self.id))


@lru_cache(maxsize=None)
def manifest_index() -> dict[str, list[list[Any]]]:
    """The shipped index (``make manifests`` writes it; tests check it is current); empty when
    missing."""
    path = manifest_dir() / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def source_manifest(manifest_id: str) -> Mapping[str, Any]:
    """A shipped source manifest: lazy when the index lists it, else read whole."""
    entry = manifest_index().get(manifest_id)
    return LazyManifest(manifest_id, entry) if entry is not None else load_manifest(manifest_id)


def build_manifest_index() -> dict[str, list[list[Any]]]:
    """The index of every shipped source manifest, computed from the manifests themselves."""
    out = {}
    for path in sorted(manifest_dir().glob("*.json")):
        if path.name == INDEX_FILE:
            continue
        data = json.loads(path.read_text())
        if "layers" in data:
            out[data["id"]] = [
                [n, [list(s) for s in shapes]] for n, shapes in weighted_layers(data)
            ]
    return out


def index_text(index: dict[str, list[list[Any]]]) -> str:
    return json.dumps(index, sort_keys=True, separators=(",", ":")) + "\n"


def clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """A layer config without initializers/regularizers/constraints/dtype policy (noise for us)."""
    return {
        k: v
        for k, v in config.items()
        if not _DROP_CONFIG.search(k) and k not in ("dtype", "trainable")
    }


def flat_layers(model: Any) -> list[tuple[str, Any]]:
    """(scope, layer) for a live Keras model's layers in order, nested models (an application
    used as a layer of the user's model, a block of the application) flattened in place at any
    depth: a layer's scope is the path of the nested models holding it (``outer/convnext_tiny``)."""
    return [(scope, layer) for scope, layer, _ in _walk(model, "")]


def nested_models(model: Any) -> dict[str, Any]:
    """Scope path -> the live nested model (see ``flat_layers``), in model order."""
    import keras

    out = {}
    for scope, layer, owner in _walk(model, "", keep_models=True):
        if isinstance(layer, keras.Model):
            out[f"{scope}/{layer.name}" if scope else layer.name] = layer
    return out


def _walk(model: Any, scope: str, keep_models: bool = False):
    """(scope, layer, owner model) depth first; nested models themselves only with
    ``keep_models``."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if keep_models:
                yield scope, layer, model
            yield from _walk(layer, f"{scope}/{layer.name}" if scope else layer.name, keep_models)
        else:
            yield scope, layer, model


def source_manifest_from_model(
    model: Any, manifest_id: str, build: dict | None = None
) -> dict[str, Any]:
    """Describe a live Keras model (needs keras; used by `--source-model` and manifest generation).
    A nested model's layers are listed in place with ``scope`` (the nested models' path, see
    ``flat_layers``), their ``op_index`` inside their own model and their ``op_path`` (see
    ``op_paths``)."""
    import keras

    layers = []
    nested = nested_models(model)
    owners = {"": model, **nested}
    op_index = {
        (scope, id(op)): i
        for scope, m in owners.items()
        for i, op in enumerate(getattr(m, "_operations", m.layers))
    }
    paths = op_paths(model)
    flat = flat_layers(model)
    for scope, layer in flat:
        variables = list(layer._trainable_variables) + list(layer._non_trainable_variables)
        where = {"scope": scope, "scope_class": type(nested[scope]).__name__} if scope else {}
        if scope and id(layer) in paths:
            where["op_path"] = paths[id(layer)]
        layers.append(
            {
                "name": layer.name,
                "class_name": type(layer).__name__,
                "op_index": op_index.get((scope, id(layer))),
                **where,
                "config": clean_config(layer.get_config()),
                "vars": [
                    {"name": v.name, "shape": list(v.shape), "dtype": str(v.dtype)}
                    for v in variables
                ],
            }
        )
    return {
        "schema": SCHEMA,
        "id": manifest_id,
        "framework": "keras",
        "flat_variables": _flat_variables(model, flat),
        "keras_version": keras.__version__,
        "build": build or {},
        "layers": layers,
    }


def tracked_operations(model: Any) -> list[Any]:
    """A model's operations as a TF object checkpoint numbers them (``_operations/<i>``): a
    Sequential's are its inner functional graph's (``_functional/_operations/<i>``, the InputLayer
    at 0)."""
    inner = getattr(model, "_functional", None)
    return list(getattr(inner if inner is not None else model, "_operations", model.layers))


def op_paths(model: Any, prefix: tuple[int, ...] = ()) -> dict[int, list[int]]:
    """id(layer) -> the ``_operations/<i>`` indices leading to it from ``model`` in a TF object
    checkpoint, nested models walked at any depth (``[2, 1]``: operation 1 of operation 2)."""
    import keras

    out: dict[int, list[int]] = {}
    for i, op in enumerate(tracked_operations(model)):
        out[id(op)] = [*prefix, i]
        if isinstance(op, keras.Model):
            out.update(op_paths(op, (*prefix, i)))
    return out


def _flat_variables(model: Any, flat: list[tuple[str, Any]]) -> list[list]:
    """``model.variables`` order (SavedModel ``variables/<i>``) as [layer index, var name], or
    [-1, path] for state that is not a layer weight (Dropout seed generators)."""
    owner = {}
    for li, (_, layer) in enumerate(flat):
        for v in list(layer._trainable_variables) + list(layer._non_trainable_variables):
            owner[id(v)] = (li, v.name)
    return [list(owner.get(id(v), (-1, v.path))) for v in model.variables]


def target_manifest_from_model(
    model: Any, manifest_id: str, library: str, name: str, kwargs: dict | None = None
) -> dict[str, Any]:
    """Describe a live PyTorch model: state-dict keys, shapes, dtypes, BN module settings."""
    import torch

    lib = importlib_version(library)
    tensors = [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
        for k, v in model.state_dict().items()
    ]
    bn = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            bn[mod_name] = {
                "eps": mod.eps,
                "momentum": mod.momentum,
                "affine": mod.affine,
                "track_running_stats": mod.track_running_stats,
            }
    return {
        "schema": SCHEMA,
        "id": manifest_id,
        "library": library,
        "library_version": lib,
        "name": name,
        "kwargs": kwargs or {},
        "tensors": tensors,
        "bn_modules": bn,
    }


def importlib_version(dist: str) -> str:
    """Installed version of ``dist``; "" for a user's own model file or module."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except (PackageNotFoundError, ValueError):
        return ""
