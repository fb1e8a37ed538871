"""Layer-by-layer verification: run the Keras source (in its own process) and the converted PyTorch
model on the same inputs, compare every layer pair the mapping table names, and optionally one
training-mode step's BatchNorm statistics.

``verify`` reads as its steps: the reference (``_reference``: recorded, or a fresh Keras run), the
PyTorch run (``_run_target``), then ``_compare_layers`` and ``_compare_output``; the verdict
(``passed``, ``first_divergent``, ``return_code``) is derived by ``VerificationReport`` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import formats
from .errors import VerificationError

DEFAULT_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2, "float64": 1e-9}
EXIT_PASS, EXIT_MISMATCH = 0, 1  # could not run: a ConverterError, exit 2
STEP_TOL = 1e-2  # allowed error of a BN update (--train-step), relative to the update itself
TRAIN_STEP_NOTE = (
    "train step: PyTorch updates running_var with the unbiased batch variance (n/(n-1)), Keras "
    "with the biased one; the comparison adds exactly p*var_biased/(n-1) to the Keras value "
    "(var_rel), the naive gap is shown as var_rel_uncorrected"
)


def _option(flag: str, help: str, default: Any = None, **cli: Any) -> Any:
    """A ``VerifyOptions`` field with its ``ckptport verify`` flag: the CLI builds its click options
    from this metadata and ``to_argv`` writes the same flags, so the two cannot drift. ``cli`` keys:
    ``type`` ("path", float, ...), ``choices``, ``metavar``."""
    return field(default=default, metadata={"flag": flag, "help": help, **cli})


@dataclass(frozen=True)
class VerifyOptions:
    """How ``verify`` runs; each field is the ``ckptport verify`` option of the same name. A head
    reset (``convert --num-classes``) needs no option: it is read from the checkpoint's metadata."""

    inputs: str | os.PathLike | np.ndarray | None = _option(
        "--inputs",
        "A .npy/.npz NHWC batch or a folder of images (default: seeded random batch in the "
        "table's input domain).",
        type="path",
    )
    batch: int = _option("--batch", "Random batch size when --inputs is not given.", 4)
    seed: int = _option("--seed", "Seed of the random batch.", 0)
    rtol: float | None = _option(
        "--rtol",
        "A layer pair, and the model output, pass when RMS(error) / RMS(reference) <= RTOL "
        "(float32 default 1e-4, or the table's [verify] rtol for a deep family).",
        type=float,
    )
    atol: float = _option("--atol", "Also pass when max |error| <= ATOL.", 0.0)
    train_step: bool = _option(
        "--train-step", "Also compare BN running stats after one training-mode step.", False
    )
    device: str = _option(
        "--device", "Where the PyTorch side runs.", "auto", choices=("auto", "cpu", "cuda")
    )
    record: str | os.PathLike | None = _option(
        "--record", "Save the Keras per-layer outputs and inputs as a reference file.", type="path"
    )
    against: str | os.PathLike | None = _option(
        "--against",
        "Verify against a recorded reference (no TensorFlow needed; SRC may be left out).",
        type="path",
    )
    mapping: str | os.PathLike | None = _option(
        "--mapping", "The user table used for the conversion.", type="path"
    )
    source_model: str | None = _option(
        "--source-model",
        "Your code that builds the Keras model, for files without config.",
        metavar="MODULE:FUNCTION",
    )
    format: str | None = _option(
        "--format", "Force the source format (see `ckptport inspect`).", metavar="NAME"
    )
    pooling: str | None = _option(
        "--pooling",
        "Pooling after a headless/nested base, for files that do not record it (TF checkpoint, "
        "SavedModel): what convert was given.",
        choices=("avg", "max", "none"),
    )
    force: bool = _option("--force", "Overwrite an existing --record output.", False)

    def to_argv(self) -> list[str]:
        """The ``ckptport verify`` flags that give these options (an ``inputs`` array must be saved
        to a file first, as ``_verify_in_subprocess`` does)."""
        if isinstance(self.inputs, np.ndarray):
            raise VerificationError("inputs given as an array cannot go on a command line; save it")
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is True:
                argv.append(f.metadata["flag"])
            elif value is not None and value is not False:
                argv += [f.metadata["flag"], str(value)]
        return argv


@dataclass
class LayerResult:
    index: int
    source_layer: str
    target_module: str
    shape: list[int]
    max_abs: float
    rel: float  # RMS(error) / RMS(reference): the verdict's measure
    cosine: float
    passed: bool
    max_rel: float = 0.0  # max abs error / RMS(reference): the worst single element


@dataclass
class BNStepResult:
    source_layer: str
    target_module: str
    keras_momentum: float
    torch_momentum: float
    n: int
    mean_rel: float
    var_rel: float
    var_rel_uncorrected: float  # what a naive comparison sees: the biased/unbiased gap
    passed: bool


DERIVED = ("passed", "first_divergent", "train_step_passed")  # in to_dict(), computed, not stored


@dataclass
class VerificationReport:
    """The results; the verdict is computed from them. ``output["comparable"]`` is False (and
    ``output["passed"]`` None) when the output cannot match, e.g. after a head reset; ``excluded``
    then names the module left out and why."""

    layers: list[LayerResult]
    output: dict[str, Any]
    rtol: float
    atol: float
    batch: int
    input_shape: list[int]
    compared: str  # "logits", "probabilities" or "none"
    train_step: list[BNStepResult] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)  # what may explain the first divergence

    @property
    def train_step_passed(self) -> bool | None:
        return None if self.train_step is None else all(r.passed for r in self.train_step)

    @property
    def first_divergent(self) -> dict[str, Any] | None:
        """The first failing layer pair in model order, else the output, else a train-step BN."""
        bad = next((r for r in self.layers if not r.passed), None)
        if bad is not None:
            return {
                "index": bad.index,
                "source_layer": bad.source_layer,
                "target_module": bad.target_module,
                "rel": bad.rel,
                "max_abs": bad.max_abs,
            }
        if self.output.get("passed") is False:
            return {
                "index": len(self.layers),
                "source_layer": "(model output)",
                "target_module": "(model output)",
                "rel": self.output["rel"],
                "max_abs": self.output["max_abs"],
            }
        bn = next((r for r in self.train_step or [] if not r.passed), None)
        if bn is not None:
            return {
                "index": None,
                "source_layer": bn.source_layer,
                "target_module": bn.target_module,
                "rel": max(bn.mean_rel, bn.var_rel),
                "max_abs": None,
                "stage": "train-step",
            }
        return None

    @property
    def passed(self) -> bool:
        return self.first_divergent is None

    @property
    def return_code(self) -> int:
        """The CLI's exit code: 0 pass, 1 mismatch (2, could not run, is an exception instead)."""
        return EXIT_PASS if self.passed else EXIT_MISMATCH

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        derived = {"passed": self.passed, "first_divergent": self.first_divergent}
        return {**derived, **d, "train_step_passed": self.train_step_passed}

    def mismatch_lines(self) -> list[str]:
        """What a mismatch prints (verify and convert): the first divergent pair and its error,
        then the hints for it; [] when passed."""
        f = self.first_divergent
        if f is None:
            return []
        where = f"{f['source_layer']} -> {f['target_module']}"
        stage = " (train step)" if f.get("stage") else ""
        return [f"first divergent layer{stage} {where} (rel {f['rel']:.3g})"] + self.hints

    def worst(self, n: int = 10) -> list[LayerResult]:
        return sorted(self.layers, key=lambda r: -r.rel)[:n]


def _metrics(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    """(max abs error, RMS(error)/RMS(ref), cosine, max abs error/RMS(ref)). The relative RMS error
    decides: the max over ~1e6 elements of pure float32 rounding noise is several times its RMS,
    so a max-based verdict would fail exact conversions of large layers."""
    ref64, got64 = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    diff = np.abs(ref64 - got64)
    max_abs = float(diff.max()) if diff.size else 0.0
    rms = float(np.sqrt(np.mean(ref64**2))) if ref64.size else 0.0
    rms_err = float(np.sqrt(np.mean(diff**2))) if diff.size else 0.0
    denom = float(np.linalg.norm(ref64) * np.linalg.norm(got64))
    cosine = float(ref64 @ got64 / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    rel = rms_err / rms if rms > 0 else rms_err
    return max_abs, rel, cosine, (max_abs / rms if rms > 0 else max_abs)


def _measure(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float, float]:
    """``_metrics`` of two tensors; the same values in another shape are compared reshaped, tensors
    of different sizes get infinite errors (a failure, never a crash)."""
    if ref.shape != got.shape:
        if ref.size != got.size:
            return float("inf"), float("inf"), 0.0, float("inf")
        ref = ref.reshape(got.shape)
    return _metrics(ref, got)


measure = _measure  # public: ckptport export compares its three outputs the same way


def _within(max_abs: float, rel: float, rtol: float, atol: float) -> bool:
    return max_abs <= atol or rel <= rtol


def _to_torch_layout(a: np.ndarray, layout: str = "", like: tuple[int, ...] | None = None):
    """A Keras tensor in PyTorch's layout. ``layout`` (the Keras runner's hint for that tensor):
    ``channels_last`` (a conv/pool/BN output, NWC/NHWC/NDHWC) -> channels first; ``as_is`` (Dense,
    LayerNorm, Embedding, recurrent outputs: batch-first either way); none (a reference recorded
    before hints): 4-D tensors permuted NHWC -> NCHW. With ``like`` (the PyTorch tensor's shape),
    the other layout is taken when only it fits."""
    moved = np.moveaxis(a, -1, 1) if a.ndim >= 3 else a
    if not layout:
        layout = "channels_last" if a.ndim == 4 else "as_is"
    first, second = (moved, a) if layout == "channels_last" else (a, moved)
    if like is not None and first.shape != tuple(like) and second.shape == tuple(like):
        return second
    return first


def torch_input(x: np.ndarray, layout: str = "") -> np.ndarray:
    """The model input as PyTorch takes it: token ids as int64, channels-last feature maps
    channels-first (``layout``: the Keras runner's hint; default: 4-D images permuted)."""
    if x.dtype.kind in "iu":
        return x.astype(np.int64)
    return np.ascontiguousarray(_to_torch_layout(x, layout))


def _make_inputs(
    inputs: str | os.PathLike | np.ndarray | None, spec: dict[str, Any], batch: int, seed: int
) -> np.ndarray:
    """A batch in the Keras model's input domain and shape (``spec["shape"]``: the source's
    declared input, e.g. (T, C) audio, (H, W, 1) grayscale, (T,) token ids; else an RGB image)."""
    if inputs is None:
        lo, hi = spec["range"]
        rng = np.random.default_rng(seed)
        h, w = spec.get("hw", (spec["size"], spec["size"]))
        shape = spec.get("shape") or (h, w, 3)
        if "int" in spec.get("dtype", "float32"):
            return rng.integers(0, spec.get("vocab", 2), (batch, *shape)).astype(np.int32)
        return rng.uniform(lo, hi, (batch, *shape)).astype(np.float32)
    if isinstance(inputs, np.ndarray):
        return _checked_inputs(inputs, spec, "inputs")
    p = Path(inputs)
    if p.is_dir():
        return _load_images(p, spec)
    try:
        data = np.load(p)
    except Exception as exc:
        raise VerificationError(
            f"{p}: cannot read inputs ({exc}); give a .npy/.npz batch or a folder of images"
        ) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        key = "x" if "x" in data.files else data.files[0]
        data = data[key]
    return _checked_inputs(data, spec, str(p))


def _checked_inputs(data: np.ndarray, spec: dict[str, Any], label: str) -> np.ndarray:
    """A user batch of the source's input shape (None dims free), else NHWC with 1 or 3 channels;
    integer arrays (token ids) stay integers."""
    shape = spec.get("declared")
    if shape is not None:
        fits = data.ndim == len(shape) + 1 and all(
            d is None or d == n for d, n in zip(shape, data.shape[1:])
        )
        if not fits:
            want = ", ".join("any" if d is None else str(d) for d in shape)
            raise VerificationError(
                f"{label}: inputs have shape {data.shape}; the source takes (batch, {want})"
            )
    elif data.ndim != 4 or data.shape[-1] not in (1, 3):
        raise VerificationError(
            f"{label}: inputs have shape {data.shape}; expected NHWC (batch, height, width,"
            " channels)"
        )
    return data.astype(np.int32 if data.dtype.kind in "iu" else np.float32)


make_inputs = _make_inputs  # public: ckptport export feeds the same verification inputs


def _load_images(folder: Path, spec: dict[str, Any]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise VerificationError(
            "reading an image folder needs Pillow: pip install pillow"
        ) from None
    exts = (".png", ".jpg", ".jpeg", ".bmp")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in exts)
    if not files:
        raise VerificationError(f"{folder} holds no .png/.jpg images")
    size = spec["size"]
    arrs = [
        np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32) for f in files
    ]
    x = np.stack(arrs)
    lo, hi = spec["range"]
    return (x / 255.0 * (hi - lo) + lo).astype(np.float32)  # pixels mapped into the input domain


@dataclass
class _Conversion:
    """What the converted checkpoint's metadata says verification needs."""

    meta: dict[str, str]
    bn_config: dict[str, Any]
    preprocessing: dict[str, Any]
    head: dict[str, Any] | None  # the head reset (``convert --num-classes``), if any


@dataclass
class _Reference:
    """The Keras side: inputs, tapped layer outputs, final output (and BN stats), with metadata."""

    tensors: dict[str, np.ndarray]
    meta: dict[str, str]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def taps(self) -> list[tuple[int, str, str]]:
        """(index, source layer, target module) of every tapped pair."""
        return [(i, s, m) for i, (s, m) in enumerate(json.loads(self.meta["taps"]))]


@dataclass
class _TargetRun:
    """The PyTorch side: the model, its input, its output and the tapped module outputs."""

    model: Any
    x: Any
    out: Any
    captured: dict[str, Any]
    timings: dict[str, float]


def _read_conversion(converted: str | os.PathLike) -> _Conversion:
    from .model import read_converted

    _, meta = read_converted(converted)
    head = json.loads(meta["head_reset"]) if meta.get("head_reset") else None
    return _Conversion(
        meta,
        json.loads(meta.get("bn_config", "{}")),
        json.loads(meta.get("preprocessing", "{}")),
        head,
    )


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise VerificationError(
            "--device cuda: PyTorch sees no CUDA device; use --device cpu or auto"
        )
    return device


def verify(
    src: str | os.PathLike | None,
    converted: str | os.PathLike,
    options: VerifyOptions | None = None,
    **kwargs: Any,
) -> VerificationReport:
    """Compare the converted model with its Keras source, layer by layer.

    Options: a ``VerifyOptions``, or its fields as keyword arguments (``inputs``, ``batch``,
    ``rtol``, ``train_step``, ``device``, ``record``, ``against``, ``mapping``, ``format``, ...),
    which override ``options``. ``against``: a reference recorded earlier with ``record`` (no
    TensorFlow needed then; ``src`` may be None). The Keras side always runs in a separate process;
    if this process already loaded TensorFlow, the whole check runs in a clean one. A layer pair
    (and the output) passes when ``rms(error) / rms(reference) <= rtol`` (float32 default 1e-4,
    or the table's ``[verify] rtol``) or ``max_abs <= atol``. After a head reset every layer up to
    the head is compared and the output is reported as not comparable.
    """
    from .model import import_torch_side, torch_side_hazard

    opts = replace(options, **kwargs) if options is not None else VerifyOptions(**kwargs)
    if torch_side_hazard():  # TF is loaded here: torchvision would crash this process, so isolate
        return _verify_in_subprocess(src, converted, opts)
    import_torch_side()
    conv = _read_conversion(converted)
    device = _resolve_device(opts.device)
    ref = _reference(src, conv, opts, device)
    taps, excluded = _exclude_head(ref.taps, conv.head)
    layouts = json.loads(ref.meta.get("layouts", "{}"))
    run = _run_target(
        converted,
        ref.tensors["input"],
        conv,
        [m for _, _, m in taps],
        device,
        layouts.get("input", ""),
    )
    rtol = _rtol(conv, opts)
    as_source = conv.meta.get("target.output") == "as-source"
    output, compared, note = _compare_output(ref, run, conv.head, rtol, opts.atol, as_source)
    x = ref.tensors["input"]
    report = VerificationReport(
        _compare_layers(ref, run, taps, rtol, opts.atol),
        output,
        rtol,
        opts.atol,
        int(x.shape[0]),
        list(x.shape),
        compared,
        timings={**ref.timings, **run.timings},
        device=device,
        notes=ref.notes + ([note] if note else []),
        excluded=excluded,
    )
    report.hints = padding_hints(report.first_divergent, taps, layouts.get("padding", []))
    if opts.train_step:
        bn_info = json.loads(ref.meta["train_step"])
        report.train_step = _train_step(run.model, run.x, ref.tensors, bn_info, conv.bn_config)
        report.notes.append(TRAIN_STEP_NOTE)
    return report


def _reference(
    src: str | os.PathLike | None, conv: _Conversion, opts: VerifyOptions, device: str
) -> _Reference:
    """The Keras side: the recorded reference (``against``) or a fresh run of ``src``; saved to
    ``record`` when asked."""
    if opts.against is not None:
        ref = _recorded_reference(Path(opts.against), conv, opts.train_step)
    else:
        if src is None:
            raise VerificationError("give the Keras source, or --against a recorded reference")
        with tempfile.TemporaryDirectory(prefix="ckptport-verify-") as tmp:
            ref = _fresh_reference(Path(src), conv, opts, device, Path(tmp))
    if opts.record is not None:
        formats.write(opts.record, ref.tensors, ref.meta, format="safetensors", force=opts.force)
    return ref


def _read_reference(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    raw = formats.read(path)
    if "ckptport.reference" not in raw.metadata:
        raise VerificationError(f"{path} is not a reference recorded by `ckptport verify --record`")
    return {k: t.load() for k, t in raw.tensors.items()}, dict(raw.metadata)


def _recorded_reference(path: Path, conv: _Conversion, train_step: bool) -> _Reference:
    tensors, meta = _read_reference(path)
    if train_step and not meta.get("train_step"):
        raise VerificationError(
            f"{path} was recorded without --train-step; record it again with it"
        )
    notes = []
    ours, theirs = conv.meta.get("source.sha256"), meta.get("source.sha256")
    if ours and theirs and ours != theirs:
        notes.append("the reference was recorded from a different source file than this conversion")
    run_s = float(meta.get("timing.source_run_s", "nan"))
    return _Reference(tensors, meta, notes, {"source_run_s": run_s})


def _fresh_reference(
    src: Path, conv: _Conversion, opts: VerifyOptions, device: str, workdir: Path
) -> _Reference:
    """Convert ``src`` again the way the checkpoint was converted (same table, source options and
    head reset) for its taps and input domain, then run the Keras model on the inputs."""
    from .pipeline import convert

    num_classes = conv.head["num_classes"] if conv.head else None
    result = convert(
        src,
        conv.meta["target"],
        mapping=opts.mapping,
        source_model=opts.source_model,
        format=opts.format,
        num_classes=num_classes,
        accept_folded_bn="source.folded_bn" in conv.meta,
    )
    x = _make_inputs(opts.inputs, _input_spec(result, opts.mapping), opts.batch, opts.seed)
    t0 = time.perf_counter()
    if result.metadata.get("source.format") == "onnx":  # onnxruntime instead of Keras
        from .onnx_runner import onnx_reference

        tensors, meta = onnx_reference(src, result, x, opts.train_step)
        notes = [f"reference: the ONNX model in onnxruntime {meta['onnxruntime.version']}"]
    else:
        tensors, meta = _read_reference(_run_keras(src, result.taps, x, opts, device, workdir))
        notes = []
    timings = {
        "source_process_s": time.perf_counter() - t0,
        "source_run_s": float(meta.get("timing.source_run_s", "nan")),
    }
    return _Reference(tensors, meta, notes, timings)


def _table_spec(
    table_id: str | None, mapping: str | os.PathLike | None, section: str, drafted: Any = None
) -> dict:
    """A section (``input``, ``verify``) of the conversion's table ({} for an unknown table); a
    drafted conversion's own table where no table fitted."""
    from .tables import builtin_tables, load_table

    if drafted is not None:
        tables = [drafted.table()]
    else:
        tables = [load_table(mapping)] if mapping else builtin_tables()
    table = next((t for t in tables if t.id == table_id), None)
    return dict(getattr(table, section)) if table else {}


def _input_spec(result: Any, mapping: str | os.PathLike | None) -> dict[str, Any]:
    """The table's [input] (size, value range); a source that declares its input is fed that
    shape (free dims at the table's size) and dtype (token ids below the Embedding's vocabulary)."""
    if "source.input" in result.metadata:  # a source that states its own (ONNX)
        return json.loads(result.metadata["source.input"])
    spec = _table_spec(result.table_id, mapping, "input", getattr(result, "drafted", None))
    fixed = result.source_input_shape
    if fixed and len(fixed) == 3 and fixed[0] and fixed[1]:
        if fixed[0] != fixed[1]:
            spec["hw"] = (fixed[0], fixed[1])
        spec["size"] = fixed[0]
    if fixed:
        spec["declared"] = list(fixed)
        spec["shape"] = [d or spec["size"] for d in fixed]
        if len(fixed) == 3 and not fixed[-1]:
            spec["shape"][-1] = 3
    spec.update(getattr(result, "source_input", None) or {})
    return spec


def _run_keras(
    src: Path,
    taps: list[tuple[str, str]],
    x: np.ndarray,
    opts: VerifyOptions,
    device: str,
    workdir: Path,
) -> Path:
    """Run ``converter.keras_runner`` in its own process; returns the reference file it wrote."""
    np.save(workdir / "inputs.npy", x)
    (workdir / "taps.json").write_text(json.dumps(taps))
    out = workdir / "reference.safetensors"
    flags = {
        "--src": src,
        "--inputs": workdir / "inputs.npy",
        "--taps": workdir / "taps.json",
        "--out": out,
        "--device": "cpu" if device == "cpu" else "auto",
        "--mapping": opts.mapping,
        "--source-model": opts.source_model,
        "--format": opts.format,
        "--pooling": opts.pooling,
    }
    cmd = [sys.executable, "-m", "converter.keras_runner"]
    cmd += [arg for flag, value in flags.items() if value for arg in (flag, str(value))]
    cmd += ["--train-step"] if opts.train_step else []
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise VerificationError(f"running the Keras source {src} failed: {_child_error(proc)}")
    return out


def _child_error(proc: subprocess.CompletedProcess) -> str:
    """Why a child process failed: its last ``error:`` line (else its last line, or the signal)."""
    if proc.returncode < 0:
        return f"the process died with signal {-proc.returncode}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = (errors or lines or [f"exit code {proc.returncode}"])[-1]
    return last.removeprefix("error: ")


def _head_reason(head: dict[str, Any]) -> str:
    return f"head reset to {head['num_classes']} classes"


def _exclude_head(
    taps: list[tuple[int, str, str]], head: dict[str, Any] | None
) -> tuple[list[tuple[int, str, str]], list[dict[str, Any]]]:
    """The taps to compare, and what is left out and why: after a head reset the target's head is
    fresh, so no pair into it can match (a reference recorded before the reset may still tap it)."""
    if head is None:
        return taps, []
    module = head["module"]
    kept = [t for t in taps if t[2] != module and not t[2].startswith(module + ".")]
    reason = _head_reason(head)
    return kept, [
        {"module": module, "source_layers": head["dropped_source_layers"], "reason": reason}
    ]


def _run_target(
    converted: str | os.PathLike,
    x: np.ndarray,
    conv: _Conversion,
    modules: list[str],
    device: str,
    input_layout: str = "",
) -> _TargetRun:
    """Load the converted model and run it on the Keras inputs (preprocessing applied), once plain
    (timed) and once with forward hooks on ``modules``."""
    import torch

    from .model import load_model

    model = load_model(converted, device=device)
    xt = x.astype(np.float64) if x.dtype.kind == "f" else x
    if conv.preprocessing.get("steps"):
        pre = conv.preprocessing
        xt = xt * np.asarray(pre["scale"]) + np.asarray(pre["offset"])
    xt = xt.astype(np.float32) if xt.dtype.kind == "f" else xt
    xt = torch.from_numpy(torch_input(xt, input_layout)).to(device)
    named = dict(model.named_modules())
    missing = [m for m in modules if m not in named]
    if missing:
        raise VerificationError(
            f"the converted model has no modules {missing[:5]}; was it converted with this table?"
        )
    timings: dict[str, float] = {}
    captured: dict[str, Any] = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        model(xt)
        timings["target_run_s"] = time.perf_counter() - t0
        hooks = [
            named[m].register_forward_hook(_capture(captured, m)) for m in dict.fromkeys(modules)
        ]
        try:
            t0 = time.perf_counter()
            out = model(xt)
            timings["target_run_with_taps_s"] = time.perf_counter() - t0
        finally:
            for h in hooks:
                h.remove()
    timings["tap_overhead_s"] = timings["target_run_with_taps_s"] - timings["target_run_s"]
    return _TargetRun(model, xt, out.detach(), captured, timings)


def _rtol(conv: Any, opts: VerifyOptions) -> float:
    """The verdict's tolerance: the option, else the table's ``[verify] rtol``, else float32's."""
    if opts.rtol is not None:
        return opts.rtol
    spec = _table_spec(conv.meta.get("table.id"), opts.mapping, "verify")
    return spec.get("rtol", DEFAULT_RTOL["float32"])


def padding_hints(
    first: dict[str, Any] | None, taps: list[tuple[int, str, str]], padding: list[dict]
) -> list[str]:
    """A hint when the first divergent source layer is a strided conv/pool with 'same' padding:
    TF pads 0 before and 1 after on even sizes (stride 2), PyTorch's ``padding=k//2`` both sides."""
    index = {src: i for i, src, _ in taps}.get(first["source_layer"]) if first else None
    cfg = padding[index] if index is not None and index < len(padding) else {}
    if cfg.get("padding") != "same" or max(cfg.get("strides", [1])) <= 1:
        return []
    return [
        f"hint: {first['source_layer']} ({cfg['class']}) has padding 'same' with strides"
        f" {tuple(cfg['strides'])}: TensorFlow pads 0 before / 1 after on even sizes where a"
        " PyTorch padding=k//2 pads both sides; pad the target asymmetrically (F.pad(x, (0, 1, 0,"
        " 1)) before a padding=0 conv, or timm's pad_type='same'); README, Background"
    ]


def _compare_layers(
    ref: _Reference, run: _TargetRun, taps: list[tuple[int, str, str]], rtol: float, atol: float
) -> list[LayerResult]:
    layers = []
    hints = json.loads(ref.meta.get("layouts", "{}")).get("taps", [])
    named = dict(run.model.named_modules())
    for i, src_layer, module in taps:
        hint = hints[i] if i < len(hints) else ""
        want = ref.tensors[f"tap/{i}"]
        got = _sequence_output(run.captured[module].cpu().numpy(), named[module], hint, want)
        max_abs, rel, cos, max_rel = _measure(_to_torch_layout(want, hint, got.shape), got)
        ok = _within(max_abs, rel, rtol, atol)
        layers.append(
            LayerResult(i, src_layer, module, list(got.shape), max_abs, rel, cos, ok, max_rel)
        )
    return layers


def _sequence_output(got: np.ndarray, module: Any, hint: str, want: np.ndarray) -> np.ndarray:
    """A torch recurrent module's output sequence as Keras returned it: batch-first, and for a
    Keras layer with return_sequences=False (hint ``last_state``) the last step (a bidirectional
    one: the forward direction's last step and the backward direction's first)."""
    if hint not in ("sequence", "last_state"):
        return got
    if got.ndim == 3 and getattr(module, "batch_first", True) is False:
        got = got.transpose(1, 0, 2)
    if hint == "sequence" or got.ndim != want.ndim + 1:
        return got
    if getattr(module, "bidirectional", False):
        h = got.shape[-1] // 2
        return np.concatenate([got[:, -1, :h], got[:, 0, h:]], axis=-1)
    return got[:, -1]


def _compare_output(
    ref: _Reference,
    run: _TargetRun,
    head: dict[str, Any] | None,
    rtol: float,
    atol: float,
    as_source: bool = False,
) -> tuple[dict[str, Any], str, str | None]:
    """(output entry, what was compared, note). A fresh head cannot match the Keras classifier: the
    output is then not comparable, which the report says (it is not a mismatch). ``as_source``:
    the target ends as the Keras model does (``ckptport port``: a final softmax included)."""
    import torch

    if head is not None:
        return _output_not_comparable(head)
    got, compared, note = run.out.cpu().numpy(), "logits", None
    if ref.meta.get("final_activation", "linear") == "softmax" and not as_source:
        got = torch.softmax(run.out.double(), dim=-1).cpu().numpy()
        compared = "probabilities"
        note = "the Keras model ends in softmax: probabilities are compared on both sides"
    hint = json.loads(ref.meta.get("layouts", "{}")).get("output", "as_is")
    want = _to_torch_layout(ref.tensors["logits"], hint, got.shape)  # a feature-map output too
    max_abs, rel, cos, max_rel = _measure(want, got)
    if want.shape != got.shape:
        note = f"output shapes differ: Keras {list(want.shape)}, PyTorch {list(got.shape)}"
    output = {
        "comparable": True,
        "max_abs": max_abs,
        "rel": rel,
        "max_rel": max_rel,
        "cosine": cos,
        "passed": _within(max_abs, rel, rtol, atol),
    }
    return output, compared, note


def _output_not_comparable(head: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    """The output entry after a head reset: excluded (no metrics, no verdict), and why."""
    dropped = ", ".join(head["dropped_source_layers"]) or "classifier"
    note = (
        f"model output not comparable: {_head_reason(head)} (fresh {head['module']}; Keras "
        f"{dropped} dropped); every layer pair before the head was compared"
    )
    output = {"comparable": False, "reason": _head_reason(head), "excluded_module": head["module"]}
    output.update(dict.fromkeys(("max_abs", "rel", "max_rel", "cosine", "passed")))
    return output, "none", note


def _verify_in_subprocess(
    src: str | os.PathLike | None, converted: str | os.PathLike, opts: VerifyOptions
) -> VerificationReport:
    """The same verification in a clean process (used when this one already loaded TensorFlow)."""
    with tempfile.TemporaryDirectory(prefix="ckptport-verify-") as tmp:
        if isinstance(opts.inputs, np.ndarray):
            np.save(Path(tmp) / "inputs.npy", opts.inputs)
            opts = replace(opts, inputs=Path(tmp) / "inputs.npy")
        paths = [str(p) for p in (src, converted) if p is not None]
        cmd = [sys.executable, "-m", "converter", "verify", *paths, *opts.to_argv(), "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (EXIT_PASS, EXIT_MISMATCH):
        raise VerificationError(_child_error(proc))
    return report_from_dict(json.loads(proc.stdout))


def report_from_dict(d: dict[str, Any]) -> VerificationReport:
    """Rebuild a report from ``to_dict()`` / ``--json`` output (the verdict is recomputed)."""
    d = {k: v for k, v in d.items() if k not in DERIVED}
    d["layers"] = [LayerResult(**r) for r in d["layers"]]
    if d.get("train_step") is not None:
        d["train_step"] = [BNStepResult(**r) for r in d["train_step"]]
    return VerificationReport(**d)


def _capture(store: dict, name: str):
    def hook(module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        store[name] = out.detach().clone()  # clone: in-place ops (ReLU(inplace=True)) follow

    return hook


def _train_step(
    model: Any,
    xt: Any,
    ref: dict[str, np.ndarray],
    bn_info: dict[str, Any],
    bn_config: dict[str, Any],
) -> list[BNStepResult]:
    """One forward pass with only BatchNorm in training mode, on both sides; compare the updates.

    Updates (after - before) are compared, not raw stats: a conv bias folded into running_mean
    shifts the PyTorch stats by the bias before and after alike. PyTorch's variance update uses the
    unbiased batch variance, Keras' the biased one: the expected PyTorch update adds exactly
    (1 - m) * var_biased / (n - 1). An error passes when it is within ``STEP_TOL`` of the update's
    RMS plus a float32 rounding floor (1e-6 of the statistic's RMS).
    """
    updates = _torch_bn_updates(model, xt)
    by_source = {cfg["source_layer"]: module for module, cfg in bn_config.items()}
    return [
        _bn_step_result(layer, info, by_source[layer], updates[by_source[layer]], ref)
        for layer, info in bn_info.items()
        if layer in by_source
    ]


def _torch_bn_updates(model: Any, xt: Any) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Each BN module's (running_mean update, running_var update, momentum) after one forward pass
    with only BatchNorm in training mode."""
    import torch

    def stats(m: Any) -> tuple[np.ndarray, np.ndarray]:
        return tuple(
            s.detach().cpu().double().numpy().copy() for s in (m.running_mean, m.running_var)
        )

    model.eval()
    bns = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    }
    before = {n: stats(m) for n, m in bns.items()}
    for m in bns.values():
        m.train()
    with torch.no_grad():
        model(xt)
    model.eval()
    after = {n: stats(m) for n, m in bns.items()}
    return {
        n: (after[n][0] - before[n][0], after[n][1] - before[n][1], float(m.momentum))
        for n, m in bns.items()
    }


def _bn_step_result(
    layer: str, info: dict[str, Any], module: str, update: tuple, ref: dict[str, np.ndarray]
) -> BNStepResult:
    """Compare one BN module's PyTorch update with the Keras layer's (Bessel term added exactly)."""
    n, m = info["n"], info["momentum"]

    def g(k: str) -> np.ndarray:
        return ref[f"bn/{layer}/{k}"].astype(np.float64)

    dk_mean = g("moving_mean_after") - g("moving_mean_before")
    dk_var = g("moving_var_after") - g("moving_var_before")
    dk_var_torch = dk_var + (1.0 - m) * g("batch_var") / (n - 1)  # Bessel, exactly
    dt_mean, dt_var, torch_momentum = update
    mean_rel = _step_error(dt_mean, dk_mean, g("moving_mean_after"))
    var_rel = _step_error(dt_var, dk_var_torch, g("moving_var_after"))
    var_unc = _step_error(dt_var, dk_var, g("moving_var_after"))
    ok = mean_rel <= STEP_TOL and var_rel <= STEP_TOL
    return BNStepResult(layer, module, m, torch_momentum, n, mean_rel, var_rel, var_unc, ok)


def _step_error(got: np.ndarray, want: np.ndarray, stat: np.ndarray) -> float:
    """max |got - want| over the update's RMS plus a float32 rounding floor (1e-6 of the
    statistic's RMS), in units where ``STEP_TOL`` is the allowed value."""
    allowed = np.sqrt(np.mean(want**2)) + 1e-6 / STEP_TOL * np.sqrt(np.mean(stat**2)) + 1e-30
    return float(np.abs(got - want).max() / allowed)
