"""The ONNX side of verification and export checks: run an ONNX model in onnxruntime with the
tapped layers' outputs added as graph outputs, and write what the Keras runner writes (a reference
the same report reads: ``input`` and 4-d taps in NHWC, ``logits``, ``tap/<i>``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FrameworkMissingError, VerificationError

ORT_EXTRA = "pip install 'ckptport[onnx]'"


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise FrameworkMissingError(f"running ONNX models needs onnxruntime: {ORT_EXTRA}") from None
    return onnxruntime


def session(model: Any) -> Any:
    """An onnxruntime CPU session of a ModelProto (or a path)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    blob = model if isinstance(model, (str, Path)) else model.SerializeToString()
    try:
        return ort.InferenceSession(
            str(blob) if isinstance(blob, Path) else blob,
            options,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VerificationError(f"onnxruntime cannot run the model: {first}") from None


def channels_last(dims: list[Any]) -> bool:
    """Whether a 4-d image input is NHWC (a Keras export) rather than NCHW."""
    return len(dims) == 4 and dims[-1] in (1, 3) and dims[1] not in (1, 3)


def run_session(sess: Any, x_nhwc: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """Run on an NHWC batch (fed in the layout the model declares); sample by sample when the
    model's batch axis is fixed at 1."""
    inp = sess.get_inputs()[0]
    dims = list(inp.shape)
    x = x_nhwc if channels_last(dims) else x_nhwc.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x.astype(np.float32))
    try:
        if dims and dims[0] == 1 and x.shape[0] > 1:
            runs = [sess.run(names, {inp.name: x[i : i + 1]}) for i in range(x.shape[0])]
            return [np.concatenate(parts) for parts in zip(*runs)]
        return sess.run(names, {inp.name: x})
    except Exception as exc:  # onnxruntime: wrong input shape, a kernel failing
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise VerificationError(
            f"onnxruntime could not run the model on inputs {list(x.shape)}: {first}"
        ) from None


def onnx_reference(src: Path, result: Any, x: np.ndarray, train_step: bool) -> tuple[dict, dict]:
    """The reference tensors and metadata of ``src`` (the ONNX model ``result`` was converted
    from) on the NHWC batch ``x``: logits and the outputs of the layers ``result.taps`` names."""
    import onnx

    from . import formats

    if train_step:
        raise VerificationError(
            "--train-step needs a source that trains (Keras); an ONNX model runs in inference only"
        )
    raw = formats.read(src, "onnx")
    outputs = {lay.name: lay.output for lay in raw.graph.layers}
    taps = [(layer, module) for layer, module in result.taps if layer in outputs]
    model = onnx.load(str(src))
    listed = {o.name for o in model.graph.output}
    first = model.graph.output[0].name
    extra = [outputs[layer] for layer, _ in taps]
    model.graph.output.extend(
        onnx.ValueInfoProto(name=n) for n in dict.fromkeys(extra) if n not in listed
    )
    t0 = time.perf_counter()
    got = run_session(session(model), x, [first, *extra])
    tensors = {"input": x, "logits": got[0]}
    for i, arr in enumerate(got[1:]):
        tensors[f"tap/{i}"] = arr.transpose(0, 2, 3, 1) if arr.ndim == 4 else arr  # NHWC, as Keras
    meta = {
        "ckptport.reference": "1",
        "taps": json.dumps(taps),
        "source.file": raw.path.name,
        "source.sha256": raw.sha256,
        "source.arch": "",
        "onnxruntime.version": import_onnxruntime().__version__,
        "final_activation": "linear",
        "train_step": "",
        "timing.source_run_s": f"{time.perf_counter() - t0:.6f}",
        "device": "cpu",
    }
    return tensors, meta
