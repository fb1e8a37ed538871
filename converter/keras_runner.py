"""Keras side of verification. Runs ONLY in its own process (``python -m converter.keras_runner``):
TensorFlow must not share a process with torchvision (that order segfaults Keras model builds).

It rebuilds the source model (from the file's own config, from the shipped manifest's build spec,
or from the user's ``--source-model``), loads the weights ckptport resolved (so every source format
goes through the same path), runs the inputs through it, taps the layers the mapping table names,
optionally runs one training-mode step, and writes everything to a reference ``.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def _configure_tf(device: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)  # never grab all GPU memory


def _build(source, manifest, source_model: str | None, size: int | None, pooling: str | None):
    from .errors import VerificationError

    if source_model:
        from .model import call_factory

        return call_factory(source_model, "--source-model")
    if source.raw.model_config is not None:
        from .keras_config import rebuild

        return rebuild(source.raw.model_config, source.raw.path)
    if manifest is None:
        raise VerificationError(
            f"{source.raw.path}: no model config and no manifest"
            + (
                f" (its layers were inferred from {source.config_origin}: there is no Keras"
                " model to run)"
                if source.config_origin == "variable names"
                else ""
            )
            + "; pass --source-model module:function that builds the Keras model"
        )
    build = manifest["build"]
    kwargs = dict(build.get("kwargs", {}))
    if size:
        kwargs["input_shape"] = [size, size, 3]
    return _with_source_head(source, build["fn"], kwargs, pooling)


def _with_source_head(source, fn: str, kwargs: dict, given_pooling: str | None):
    """The shipped architecture rebuilt with the source's head: ``classes=N``, headless with its
    pooling, or nested in a model ``base(training=False) -> pooling -> Dense(N)`` (a config-less
    file does not record the pooling: ``--pooling``, else avg, as convert does)."""
    import keras

    from .heads import resolve_pooling

    head = source.head
    pooling = resolve_pooling(source, given_pooling, []) if head else None
    if head and (source.nesting or head.kind == "headless"):
        kwargs.update(include_top=False, pooling=None if source.nesting else pooling)
    elif head and head.kind == "classifier":
        kwargs["classes"] = head.num_classes
    base = getattr(keras.applications, fn)(**kwargs)
    if not source.nesting:
        return base
    if head.kind != "classifier" or pooling is None:
        from .errors import VerificationError

        raise VerificationError(
            f"{source.raw.path}: cannot rebuild the user's model around the base; pass"
            " --source-model"
        )
    inputs = keras.Input(base.input_shape[1:])
    pool = {"avg": keras.layers.GlobalAveragePooling2D, "max": keras.layers.GlobalMaxPooling2D}[
        pooling
    ]
    return keras.Model(
        inputs, keras.layers.Dense(head.num_classes)(pool()(base(inputs, training=False)))
    )


def _load_weights(model, source) -> dict[str, str]:
    """Assign the resolved weights to the live model (a nested base's layers included); returns
    file layer name -> live layer name."""
    from .manifest import flat_layers, source_manifest_from_model
    from .source import match_scoped_layers, skeleton_from_manifest, unnumbered_var

    live = skeleton_from_manifest(source_manifest_from_model(model, "live"))
    live_layers = [layer for _, layer in flat_layers(model)]
    bases = (source.nesting.layer, _live_base(model, source)) if source.nesting else ("", "")
    index = match_scoped_layers([lay for lay in source.layers if lay.weights], live, bases)
    mapping = {}
    for lay in source.layers:
        if not lay.weights:
            continue
        klayer = live_layers[index[lay.name]]
        mapping[lay.name] = klayer.name
        for name, v in live_variables(klayer):
            if name not in lay.weights:
                from .errors import VerificationError

                raise VerificationError(f"layer {lay.name}: the file has no variable {name}")
            v.assign(lay.load(name).astype(v.dtype))
        if hasattr(klayer, "finalize_state"):
            klayer.finalize_state()  # Normalization computes with a snapshot of its variables
    return mapping


def live_variables(layer) -> list:
    """(variable name as ckptport reads it, variable) of a live layer: its own variables, a
    recurrent layer's cell's, a Bidirectional's ``forward/...`` and ``backward/...``."""
    from .source import unnumbered_var

    if type(layer).__name__ == "Bidirectional":
        return [
            (f"{d}/{name}", v)
            for d, sub in (("forward", layer.forward_layer), ("backward", layer.backward_layer))
            for name, v in live_variables(sub)
        ]
    own = list(layer._trainable_variables) + list(layer._non_trainable_variables)
    if not own and hasattr(layer, "cell"):
        return live_variables(layer.cell)
    return [(unnumbered_var(v.name), v) for v in own]


def _live_base(model, source) -> str:
    """The nested base's path in the live model: the source's own where the model was rebuilt from
    the file's config, else the one application ``_with_source_head`` nested."""
    from .manifest import nested_models

    nested = nested_models(model)
    if source.nesting.layer in nested:
        return source.nesting.layer
    return next(path for path, m in nested.items() if "/" not in path)


def _owners(model) -> dict[int, tuple[str, object]]:
    """id(layer) -> (path, model) of the (nested) model whose own layer it is."""
    from .manifest import nested_models

    out = {}
    for path, owner in [("", model), *nested_models(model).items()]:
        out.update({id(layer): (path, owner) for layer in owner.layers})
    return out


def _fed_by_input(model, path: str) -> bool:
    """Whether the nested model at ``path`` receives the model's input as is (each level nested
    directly, the way the user's model wraps an application): its own graph can then be run on
    ``x``."""
    from .manifest import nested_models

    nested, parent = nested_models(model), model
    for depth, part in enumerate(path.split("/") if path else []):
        child = nested["/".join(path.split("/")[: depth + 1])]
        first = [lay for lay in parent.layers if type(lay).__name__ != "InputLayer"]
        if not first or first[0] is not child:
            return False
        parent = child
    return True


def _run_owned(model, layers: list, x: np.ndarray, fetch, training: bool) -> dict[int, list]:
    """id(layer) -> ``fetch(layer)`` (a list of its tensors) evaluated on ``x``, each group of
    layers run once in the graph of the (nested) model owning them; raises where that model is
    not fed the input as is."""
    import keras

    from .errors import VerificationError

    owners, groups = _owners(model), {}
    for lay in layers:
        groups.setdefault(owners[id(lay)][0], []).append(lay)
    got = {}
    for path, group in groups.items():
        owner = owners[id(group[0])][1]
        if not _fed_by_input(model, path):
            raise VerificationError(
                f"layer {group[0].name!r} is inside {path!r}, which does not receive the model's"
                " input as is: verify the nested model alone (--source-model)"
            )
        wanted = [fetch(lay) for lay in group]
        flat = [t for ts in wanted for t in ts]
        outs = iter(_as_list(keras.Model(owner.inputs, flat)(x, training=training)))
        got.update({id(lay): [next(outs) for _ in ts] for lay, ts in zip(group, wanted)})
    return got


def _tap_outputs(model, tap_layers: list, x: np.ndarray) -> list:
    """The tapped layers' outputs then the model's output, in eval mode. A nested model's layers
    live in its own graph: they are tapped on it called on ``x`` (the user's model feeds its input
    straight to the base); a nested Sequential block is tapped whole, as a layer of its parent."""
    got = _run_owned(model, tap_layers, x, lambda lay: [lay.output], training=False)
    logits = _as_list(model(x, training=False))[0]
    return [got[id(lay)][0] for lay in tap_layers] + [logits]


def _as_list(outs) -> list:
    return list(outs) if isinstance(outs, (list, tuple)) else [outs]


def run(args: argparse.Namespace) -> None:
    """Rebuild the source, load ckptport's weights into it, tap it (and take one training step
    when asked) and write the reference file."""
    from . import formats

    source, manifest = _resolve(args)
    x = np.load(args.inputs)
    x = x.astype("int32" if x.dtype.kind in "iu" else "float32")  # token ids stay integers
    taps = json.loads(Path(args.taps).read_text())
    _configure_tf(args.device)
    import keras

    from .manifest import flat_layers, nested_models

    model = _build(source, manifest, args.source_model, x.shape[1], args.pooling)
    live = _load_weights(model, source)
    # a nested Sequential block (ConvNeXt's stem) is tapped whole, by its own name
    by_name = {layer.name: layer for layer in model.layers}
    by_name.update({m.name: m for m in nested_models(model).values()})
    by_name.update({layer.name: layer for _, layer in flat_layers(model)})
    tap_layers = [by_name[live.get(src, src)] for src, _ in taps]
    tensors, t_run = _inference_tensors(model, tap_layers, x)
    bn_info = {}
    if args.train_step:
        bn_info = _train_step(model, x, {v: k for k, v in live.items()}, tensors)
    meta = {
        "ckptport.reference": "1",
        "taps": json.dumps(taps),
        "source.file": source.raw.path.name,
        "source.sha256": source.raw.sha256,
        "source.arch": source.manifest_id or "",
        "keras.version": keras.__version__,
        "final_activation": str(_final_activation(model) or "linear"),
        "train_step": json.dumps(bn_info) if args.train_step else "",
        "timing.source_run_s": f"{t_run:.6f}",
        "device": "cpu" if args.device == "cpu" else "auto",
        "layouts": json.dumps(
            {
                "input": input_layout(model),
                "taps": [layer_layout(lay) for lay in tap_layers],
                "padding": [layer_padding(lay) for lay in tap_layers],
                "output": layer_layout(model.layers[-1]),
            }
        ),
    }
    formats.write(args.out, tensors, meta, format="safetensors", force=True)
    assert "torchvision" not in sys.modules, "torchvision must never be imported next to Keras"


def _resolve(args: argparse.Namespace):
    """The source as ckptport resolves it (the same path for every format) and its manifest."""
    from .manifest import load_manifest
    from .source import resolve_source
    from .tables import load_tables

    if args.source_model:
        _configure_tf(args.device)  # before the user's code imports TensorFlow
    source = resolve_source(
        args.src, load_tables(args.mapping), source_model=args.source_model, format=args.format
    )
    return source, load_manifest(source.manifest_id) if source.manifest_id else None


def _final_activation(model) -> str | None:
    last = model.layers[-1]
    return last.get_config().get("activation") if hasattr(last, "get_config") else None


def _inference_tensors(model, tap_layers: list, x: np.ndarray) -> tuple[dict, float]:
    """Input, logits and ``tap/<i>`` outputs (eval mode), and the seconds the run took."""
    t0 = time.perf_counter()
    outs = _tap_outputs(model, tap_layers, x)
    t_run = time.perf_counter() - t0
    tensors = {"input": x, "logits": np.asarray(outs[-1], np.float32)}
    for i, o in enumerate(outs[:-1]):
        tensors[f"tap/{i}"] = np.asarray(o, np.float32)
    return tensors, t_run


def _train_step(model, x: np.ndarray, file_names: dict[str, str], tensors: dict) -> dict:
    """One training-mode forward pass (only BatchNorm in training mode: dropout off): each BN's
    batch statistics and moving statistics before/after go to ``tensors`` under ``bn/<file
    layer name>/``; returns each BN's count, momentum and epsilon."""
    from .manifest import flat_layers

    every = [lay for _, lay in flat_layers(model)]
    for lay in every:
        if hasattr(lay, "rate"):
            lay.rate = 0.0
    bns = [lay for lay in every if type(lay).__name__ == "BatchNormalization"]
    if not bns:  # a BN-free model (VGG): no update to compare
        return {}
    before = {b.name: (b.moving_mean.numpy().copy(), b.moving_variance.numpy().copy()) for b in bns}
    # each BN's input, and its output so that every BN runs (and updates) exactly once
    got = _run_owned(model, bns, x, lambda b: [b.input, b.output], training=True)
    bn_info = {}
    for b, inp in zip(bns, [got[id(b)][0] for b in bns]):
        a = np.asarray(inp, np.float64)
        axis = b.axis[0] if isinstance(b.axis, (list, tuple)) else b.axis
        axes = tuple(i for i in range(a.ndim) if i != axis % a.ndim)  # BN on any axis
        name = file_names.get(b.name, b.name)
        tensors[f"bn/{name}/batch_mean"] = a.mean(axis=axes).astype(np.float32)
        tensors[f"bn/{name}/batch_var"] = a.var(axis=axes).astype(np.float32)  # biased, as Keras
        mean, var = before[b.name]
        tensors[f"bn/{name}/moving_mean_before"], tensors[f"bn/{name}/moving_var_before"] = (
            mean,
            var,
        )
        tensors[f"bn/{name}/moving_mean_after"] = b.moving_mean.numpy()
        tensors[f"bn/{name}/moving_var_after"] = b.moving_variance.numpy()
        bn_info[name] = {
            "n": int(np.prod([a.shape[i] for i in axes])),
            "momentum": float(b.momentum),
            "epsilon": float(b.epsilon),
        }
    return bn_info


RECURRENT = ("LSTM", "GRU", "SimpleRNN", "Bidirectional")


def layer_padding(layer) -> dict:
    """A conv or pool's padding and strides (what a mismatch hint reads), else {}."""
    padding, strides = getattr(layer, "padding", None), getattr(layer, "strides", None)
    if not isinstance(padding, str) or strides is None:
        return {}
    return {"class": type(layer).__name__, "padding": padding, "strides": list(strides)}


def layer_layout(layer) -> str:
    """How this layer's output relates to its PyTorch twin's: ``channels_last`` (a conv, pool or
    BN over the last axis of a >= 3-d tensor: PyTorch has channels first), ``sequence`` /
    ``last_state`` (a recurrent layer returning sequences or its last state: batch-first), or
    ``as_is`` (Dense, LayerNorm, Embedding, ...: the same layout in both)."""
    cls = type(layer).__name__
    if cls in RECURRENT:
        inner = getattr(layer, "forward_layer", layer)
        return "sequence" if getattr(inner, "return_sequences", False) else "last_state"
    try:
        ndim = len(layer.output.shape)
    except (AttributeError, ValueError):
        return ""
    if ndim < 3:
        return "as_is"
    if getattr(layer, "data_format", None) in ("channels_last", "channels_first"):
        return "channels_last" if layer.data_format == "channels_last" else "as_is"
    if cls == "BatchNormalization":
        axis = layer.axis[0] if isinstance(layer.axis, (list, tuple)) else layer.axis
        return "channels_last" if axis % ndim == ndim - 1 else "as_is"
    if cls in ("Dense", "EinsumDense", "LayerNormalization", "Embedding"):
        return "as_is"
    return "channels_last" if ndim == 4 else ""


def input_layout(model) -> str:
    """The model input's layout for PyTorch: that of the first layer reading it (a Conv1D's input
    goes channels-first, an LSTM's or a Dense's stays as it is)."""
    first = next((lay for lay in model.layers if type(lay).__name__ != "InputLayer"), None)
    if first is None:
        return ""
    if hasattr(first, "layers"):  # a nested model reads the input: its own first layer decides
        return input_layout(first)
    hint = layer_layout(first)
    return "as_is" if hint in ("sequence", "last_state") else hint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m converter.keras_runner")
    ap.add_argument("--src", required=True)
    ap.add_argument("--format")
    ap.add_argument("--mapping")
    ap.add_argument("--source-model")
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--taps", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-step", action="store_true")
    ap.add_argument("--pooling", choices=("avg", "max", "none"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    from .errors import ConverterError

    try:
        run(args)
    except ConverterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Keras/TensorFlow failing on the source: its message is the cause
        import traceback

        traceback.print_exc()
        reason = " ".join(str(exc).split())
        print(
            f"error: Keras failed on {args.src}: {type(exc).__name__}:"
            f" {reason[:400]}{'...' if len(reason) > 400 else ''}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
