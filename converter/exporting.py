"""``ckptport export``: a converted checkpoint to ONNX, checked three ways in one report.

The model is built as ``converter.load_model`` builds it (target, surgeries, BN momentum/eps,
strict load), exported with ``torch.onnx`` (dynamo, batch axis dynamic), then run in onnxruntime on
the verification inputs (a seeded batch in the source's input domain, ``inputs``, or the input of a
recorded reference): onnxruntime vs PyTorch, and with ``against`` (a ``verify --record`` file)
both vs the source's recorded logits. Written atomically; never over an existing file without
``force``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import formats
from .errors import ConverterError, VerificationError

EXPORT_RTOL = 1e-4  # RMS(error) / RMS(reference), as verify measures a layer pair


@dataclass
class Comparison:
    """One pair of the three-way check (``a`` against reference ``b``)."""

    a: str
    b: str
    max_abs: float
    rel: float
    passed: bool


@dataclass
class ExportReport:
    """What ``export`` wrote and how its ONNX model compares."""

    output: str
    opset: int
    bn_kept: bool
    batch: int
    input_shape: list[int]
    comparisons: list[Comparison]
    rtol: float = EXPORT_RTOL
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def return_code(self) -> int:
        return 0 if self.passed else 1

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, **asdict(self)}


def export_onnx(
    converted: str | os.PathLike,
    output: str | os.PathLike,
    *,
    against: str | os.PathLike | None = None,
    inputs: str | os.PathLike | None = None,
    batch: int = 2,
    seed: int = 0,
    keep_bn: bool = False,
    opset: int | None = None,
    force: bool = False,
) -> ExportReport:
    """Export ``converted`` to ONNX at ``output`` and compare onnxruntime with PyTorch (and with
    the source's recorded logits when ``against`` is given). ``keep_bn``: keep BatchNormalization
    nodes (no folding: what fine-tuning elsewhere needs); default: torch.onnx's optimised graph."""
    from .model import load_model

    out = formats.check_output(output, force, (converted,))
    model = load_model(converted)
    x_nhwc, ref = _inputs(converted, model.ckptport_metadata, against, inputs, batch, seed)
    xt = _preprocessed(x_nhwc, model.ckptport_metadata)
    t0 = time.perf_counter()
    program_opset = _export(model, xt, out, keep_bn, opset, force, converted)
    timings = {"export_s": time.perf_counter() - t0}
    comparisons, more = _compare(model, xt, out, ref)
    note = [] if ref is not None else ["no --against reference: compared with PyTorch only"]
    pre = json.loads(model.ckptport_metadata.get("preprocessing", "{}"))
    if pre.get("steps"):
        note.append(
            "the ONNX model takes the PyTorch model's input: apply the preprocessing moved out of"
            f" the source first (x * {pre['scale']} + {pre['offset']})"
        )
    shape = list(xt.shape)
    report = ExportReport(str(out), program_opset, keep_bn, shape[0], shape, comparisons)
    report.timings, report.notes = {**timings, **more}, note
    return report


def _inputs(converted, meta, against, inputs, batch, seed) -> tuple[np.ndarray, Any]:
    """The NHWC batch (the recorded reference's input when given) and the reference logits."""
    from .verification import make_inputs

    if against is not None:
        raw = formats.read(against)
        if "ckptport.reference" not in raw.metadata:
            raise VerificationError(
                f"{against} is not a reference recorded by `ckptport verify --record`"
            )
        return raw.tensors["input"].load(), raw.tensors["logits"].load()
    return make_inputs(inputs, _input_spec(meta), batch, seed), None


def _input_spec(meta: dict[str, str]) -> dict[str, Any]:
    """The source's input domain: what the conversion recorded (ONNX), else the table's."""
    from .tables import builtin_tables

    if "source.input" in meta:
        return json.loads(meta["source.input"])
    for table in builtin_tables():
        if table.id == meta.get("table.id"):
            return dict(table.input)
    return {"size": 224, "range": [0.0, 1.0]}


def _preprocessed(x_nhwc: np.ndarray, meta: dict[str, str]) -> Any:
    """The PyTorch (NCHW) input: the preprocessing moved out of a Keras model applied first."""
    import torch

    x = x_nhwc.astype(np.float64)
    pre = json.loads(meta.get("preprocessing", "{}"))
    if pre.get("steps"):
        x = x * np.asarray(pre["scale"]) + np.asarray(pre["offset"])
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2).contiguous()


def _export(model, xt, out: Path, keep_bn: bool, opset, force: bool, converted) -> int:
    """torch.onnx (dynamo, dynamic batch), written atomically as one file; the opset used."""
    import torch

    def writer(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="ckptport-export-") as d:
            path = Path(d) / "model.onnx"
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (xt,),
                    str(path),
                    dynamo=True,
                    external_data=False,
                    optimize=not keep_bn,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                )
            os.replace(path, tmp)

    try:
        formats.write_atomic(out, writer, force=force, inputs=(converted,))
    except ConverterError:
        raise
    except Exception as exc:  # torch.export / the ONNX translation refused the model
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VerificationError(f"torch.onnx could not export the model: {first}") from None
    import onnx

    proto = onnx.load(str(out), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _compare(model, xt, out: Path, ref) -> tuple[list[Comparison], dict[str, float]]:
    """onnxruntime vs PyTorch, and both vs the recorded source logits when there are some."""
    import torch

    from .onnx_runner import run_session, session
    from .verification import measure

    with torch.no_grad():
        y_torch = model(xt).numpy()
    t0 = time.perf_counter()
    y_onnx = run_session(session(out), xt.permute(0, 2, 3, 1).numpy())[0]  # NHWC in, NCHW fed
    timings = {"onnxruntime_s": time.perf_counter() - t0}
    pairs = [("onnxruntime", "pytorch", y_onnx, y_torch)]
    if ref is not None:
        pairs += [("onnxruntime", "source", y_onnx, ref), ("pytorch", "source", y_torch, ref)]
    rows = []
    for a, b, got, want in pairs:
        max_abs, rel = measure(want, got)[:2]
        rows.append(Comparison(a, b, max_abs, rel, rel <= EXPORT_RTOL))
    return rows, timings
