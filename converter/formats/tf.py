"""TensorFlow checkpoints (object-based and name-based) and SavedModel directories, read with the
pure-Python tensor-bundle reader (no tensorflow import)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register
from .tf_keras_graph import read_keras_graph

_NOT_STATE = re.compile(
    r"(^_CHECKPOINTABLE_OBJECT_GRAPH$)|(^save_counter/)|(^(.*/)?optimizer/)|(\.OPTIMIZER_SLOT/)"
    r"|(^_all_variables/)"
    r"|(^keras_api/)|(^signatures/)"
)


def _bundle_tensors(prefix: Path, label: Path) -> tuple[dict[str, RawTensor], dict[str, str]]:
    from . import tf_bundle

    entries = tf_bundle.read_index(prefix)
    tensors: dict[str, RawTensor] = {}
    ignored: dict[str, str] = {}
    has_flat = any(k.startswith("variables/") for k in entries)
    for name, entry in entries.items():
        if name.startswith("_all_variables/") and not has_flat:
            raise SourceFormatError(
                f"{label} numbers its variables only as _all_variables/<i>, an order that is not"
                " the model's (measured: Keras 3 export); re-export it with model.export(), or"
                " convert the Keras model's .keras/.weights.h5 instead"
            )
        if entry.dtype == "string" or _NOT_STATE.search(name):
            ignored[name] = (
                "checkpoint bookkeeping, optimizer state, or a duplicate (_all_variables)"
            )
            continue
        tensors[name] = RawTensor(
            name, tuple(entry.shape), entry.dtype, lambda e=entry: tf_bundle.load_tensor(prefix, e)
        )
    if not tensors:
        raise SourceFormatError(
            f"{label} holds no model variables (only {len(ignored)} bookkeeping entries)"
        )
    return tensors, ignored


def _is_savedmodel(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "variables" / "variables.index").is_file()
        and ((path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file())
    )


@register
class SavedModel(Format):
    name = "savedmodel"
    description = "TensorFlow SavedModel directory (its variables/)"
    extensions = ("<dir>/saved_model.pb",)

    def sniff(self, path: Path) -> bool:
        return _is_savedmodel(path)

    def read(self, path: Path) -> RawCheckpoint:
        prefix = path / "variables" / "variables"
        tensors, ignored = _bundle_tensors(prefix, path)
        raw = RawCheckpoint(path, self.name, tensors, ignored=ignored)
        keras = read_keras_graph(path, _object_graph_blob(prefix))
        if keras is not None:
            raw.model_config, raw.object_paths = keras.model_config, keras.object_paths
            raw.notes += [f"model config read from {keras.source} (tf.keras 2.x)", *keras.notes]
        return raw


def _object_graph_blob(prefix: Path) -> bytes | None:
    """The bundle's TrackableObjectGraph (``_CHECKPOINTABLE_OBJECT_GRAPH``), if it has one."""
    from . import tf_bundle

    entry = tf_bundle.read_index(prefix).get("_CHECKPOINTABLE_OBJECT_GRAPH")
    if entry is None:
        return None
    return bytes(tf_bundle.load_tensor(prefix, entry).reshape(-1)[0])


@register
class TFCheckpoint(Format):
    name = "tf-checkpoint"
    description = "TensorFlow checkpoint (prefix, .index file, or directory)"
    extensions = (".index", "<prefix>", "<dir>/checkpoint")

    def sniff(self, path: Path) -> bool:
        if _is_savedmodel(path):
            return False
        from . import tf_bundle

        try:
            return tf_bundle.sniff(path)
        except SourceFormatError:
            return False

    def read(self, path: Path) -> RawCheckpoint:
        from . import tf_bundle

        prefix = tf_bundle.resolve_prefix(path)
        tensors, ignored = _bundle_tensors(prefix, path)
        raw = RawCheckpoint(prefix, self.name, tensors, ignored=ignored)
        raw.notes += _state_file_notes(Path(path), prefix)
        if not any(".ATTRIBUTES/" in k for k in tensors):  # name-based (TF1 Saver)
            from .tf1 import prepare_name_based

            prepare_name_based(raw, prefix)
        return raw


def _state_file_notes(path: Path, prefix: Path) -> list[str]:
    """What to say when a directory's ``checkpoint`` file names another path than the one read."""
    from . import tf_bundle

    target = tf_bundle.state_file_target(path) if path.is_dir() else None
    if target is None or Path(target) == prefix or (path / target) == prefix:
        return []
    if Path(target).name == prefix.name:
        return [f"the checkpoint file names {target} (another machine's path): read {prefix}"]
    return [
        f"the checkpoint file names {target}, which is not here: read the one bundle present,"
        f" {prefix}"
    ]
