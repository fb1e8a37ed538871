"""``ckptport port``: write a readable PyTorch module from a Keras model's stored config, and its
weights through the ordinary conversion path.

Steps: read the file's model config as a graph (:mod:`.graph`, JSON only: nothing is executed),
write the module (:mod:`.codegen`, one :mod:`.emitters` entry per Keras class), write a mapping
table with one rule per weighted layer (:mod:`.table`), convert with it
(:func:`converter.pipeline.convert`) and verify layer by layer (:func:`converter.verify`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import formats
from ..errors import SourceFormatError, UnsupportedLayerError
from . import layer_emitters, sequence_emitters, shape_emitters  # noqa: F401  (registering)
from .codegen import ModuleSource, Stub, class_identifier, write_module
from ..keras_graph import Graph, read_graph
from .table import table_toml

BLACK_LINE_LENGTH = 88  # black's default: the generated file passes a plain `black --check`


@dataclass
class PortResult:
    """What ``port`` wrote and found."""

    module_path: Path
    weights_path: Path
    class_name: str
    layers: int  # Keras calls ported
    modules: int  # weighted layers mapped by the table
    stubs: list[Stub]
    conversion: Any  # converter.pipeline.ConversionResult
    report: Any = None  # converter.verification.VerificationReport, when verified
    notes: list[str] = field(default_factory=list)


def port(
    src: str | os.PathLike,
    output: str | os.PathLike,
    *,
    allow_stubs: bool = False,
    verify: bool = True,
    force: bool = False,
    format: str | None = None,
) -> PortResult:
    """Write ``output`` (a ``.py`` module with ``factory()``) and its ``.safetensors`` beside it
    from a Keras file that stores its model config (``.keras``, legacy ``.h5``). Layers with no
    PyTorch twin become stubs; unless ``allow_stubs`` that is an error naming them. ``verify``:
    compare with Keras layer by layer (and one training-mode BN step) when the model takes one
    image; skipped with a note otherwise."""
    py, weights = _outputs(src, output, force)
    source, graph = read_source(src, format)
    module = write_module(graph, layer_weights(source), class_identifier(_model_name(source)))
    _check_stubs(source.raw.path, module, allow_stubs)
    code = format_code(header(source.raw.path.name, weights.name, module) + module.code)
    formats.write_atomic(py, lambda tmp: tmp.write_text(code), force=force)
    try:
        return _convert_and_verify(src, py, weights, source, module, format, verify, force)
    except BaseException:
        py.unlink(missing_ok=True)
        raise


def _outputs(src: str | os.PathLike, output: str | os.PathLike, force: bool) -> tuple[Path, Path]:
    py = Path(output)
    if py.suffix != ".py":
        raise SourceFormatError(f"output {py} must be a .py file (the weights go beside it)")
    weights = py.with_suffix(".safetensors")
    for path in (py, weights):
        formats.check_output(path, force, (src,))
    return py, weights


def read_source(src: str | os.PathLike, format: str | None = None) -> tuple[Any, Graph]:
    """The resolved source (its weights) and the graph of its stored config."""
    from ..source import resolve_source

    raw = formats.read(src, format)
    if raw.model_config is None:
        raise SourceFormatError(
            f"{raw.path} stores no model config ({raw.format}); port needs the architecture: give"
            " the .keras file, or a legacy .h5 saved with model.save()"
        )
    return resolve_source(raw, []), read_graph(raw.model_config, str(raw.path))


def layer_weights(source: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    return {
        lay.name: {v: tuple(t.shape) for v, t in lay.weights.items()}
        for lay in source.layers
        if lay.weights
    }


def _model_name(source: Any) -> str:
    cfg = source.raw.model_config
    return cfg.get("name") or (cfg.get("config") or {}).get("name") or "Model"


def _check_stubs(path: Path, module: ModuleSource, allow: bool) -> None:
    if module.stubs and not allow:
        named = "; ".join(f"{s.layer!r} ({s.class_name}: {s.reason})" for s in module.stubs[:8])
        more = f" and {len(module.stubs) - 8} more" if len(module.stubs) > 8 else ""
        raise UnsupportedLayerError(
            f"{path}: {len(module.stubs)} layer(s) have no PyTorch port: {named}{more}; pass"
            " --allow-stubs to write them as stub classes to fill in by hand"
        )


def header(source_name: str, weights_name: str, module: ModuleSource) -> str:
    layout = ", ".join(f"{name}: {torch_shape(shape)}" for name, shape in module.inputs)
    return (
        f'"""PyTorch port of the Keras model in {source_name}, written by `ckptport port`.\n\n'
        f"Inputs and outputs are channels-first like torchvision's ({layout}). BatchNorm\n"
        "momentum is PyTorch's (1 - Keras momentum) and eps the source's. Weights:\n\n"
        "    from safetensors.torch import load_file\n\n"
        "    model = factory()\n"
        f'    model.load_state_dict(load_file("{weights_name}"))\n"""\n\n'
    )


def format_code(code: str) -> str:
    """The code as black writes it at its default line length (unchanged when black is not
    installed: the code is written close to black's style, and ``port`` notes it)."""
    try:
        import black
    except ImportError:
        return code
    return black.format_str(code, mode=black.Mode(line_length=BLACK_LINE_LENGTH))


def torch_shape(shape: list[int | None]) -> str:
    """A Keras input shape (no batch) as the channels-first shape the module takes."""
    dims = ["?" if d is None else str(d) for d in shape]
    dims = dims[-1:] + dims[:-1] if len(dims) > 1 else dims
    return f"(N, {', '.join(dims)})"


def _convert_and_verify(
    src: str | os.PathLike,
    py: Path,
    weights: Path,
    source: Any,
    module: ModuleSource,
    format: str | None,
    verify: bool,
    force: bool,
) -> PortResult:
    """Convert with the port's table (written to a temporary file), save, verify."""
    from ..pipeline import convert

    target = f"{py.resolve()}:factory"
    notes = [] if _has_black() else ["black is not installed: the file was not formatted"]
    with tempfile.TemporaryDirectory(prefix="ckptport-port-") as tmp:
        mapping = Path(tmp) / "port.toml"
        spec = input_spec(module, source)
        mapping.write_text(table_toml(f"port:{py.stem}", target, module.rules, module.stubs, spec))
        result = convert(src, target, mapping=mapping, format=format)
        result.metadata["target.output"] = "as-source"  # the module ends as the Keras model
        result.save(weights, force=force)
        report, why = None, verify_skipped(module, verify)
        if why is None:
            from ..verification import verify as run_verify

            train_step = bool(result.bn_config)
            report = run_verify(src, weights, mapping=mapping, format=format, train_step=train_step)
        elif verify:
            notes.append(f"verification skipped: {why}")
    return PortResult(
        py,
        weights,
        module.class_name,
        len(source.layers),
        len(module.rules),
        module.stubs,
        result,
        report,
        notes + result.notes + nesting_notes(source),
    )


def nesting_notes(source: Any) -> list[str]:
    """What inlining a nested model changes for fine-tuning."""
    nesting = source.nesting
    if nesting is None or nesting.training is not False:
        return []
    return [
        f"the nested model {nesting.layer!r} is called with training=False in Keras (its BatchNorm"
        " stays frozen while fine-tuning); its layers are inlined here: keep their BatchNorm in"
        " eval mode (converter.bn.freeze) to fine-tune the same way"
    ]


def _has_black() -> bool:
    try:
        import black  # noqa: F401
    except ImportError:
        return False
    return True


def input_spec(module: ModuleSource, source: Any) -> dict[str, Any]:
    """The table's [input]: the declared size (else 32) and the value range verification feeds:
    pixels when the model starts with Rescaling/Normalization, else [-1, 1]."""
    shape = module.inputs[0][1] if module.inputs else []
    size = shape[0] if len(shape) == 3 and shape[0] else 32
    first = next((lay.class_name for lay in source.layers if lay.class_name != "InputLayer"), "")
    pixels = first in ("Rescaling", "Normalization")
    return {"size": size, "range": [0.0, 255.0] if pixels else [-1.0, 1.0]}


def verify_skipped(module: ModuleSource, verify: bool) -> str | None:
    """Why layer-by-layer verification cannot run on this model (None: it can)."""
    if not verify:
        return "--no-verify"
    if module.stubs:
        return "the module has stubs"
    if len(module.inputs) != 1:
        return "verify feeds one input; this model takes several"
    if len(module.outputs) != 1:
        return "verify compares one output; this model has several"
    return None
