"""Layer-by-layer verification: run the Keras source (in its own process) and the converted PyTorch
model on the same inputs, compare every layer pair the mapping table names, and optionally one
training-mode step's BatchNorm statistics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import formats
from .errors import VerificationError

DEFAULT_RTOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2, "float64": 1e-9}


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


@dataclass
class VerificationReport:
    passed: bool
    first_divergent: dict[str, Any] | None
    layers: list[LayerResult]
    output: dict[str, Any]
    rtol: float
    atol: float
    batch: int
    input_shape: list[int]
    compared: str  # "logits" or "probabilities"
    train_step: list[BNStepResult] | None = None
    train_step_passed: bool | None = None
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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


def _to_torch_layout(a: np.ndarray) -> np.ndarray:
    return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def _make_inputs(inputs: str | os.PathLike | np.ndarray | None, spec: dict[str, Any], batch: int, seed: int) -> np.ndarray:
    """NHWC float32 batch in the Keras model's input domain."""
    if inputs is None:
        lo, hi = spec["range"]
        rng = np.random.default_rng(seed)
        h, w = spec.get("hw", (spec["size"], spec["size"]))
        return rng.uniform(lo, hi, (batch, h, w, 3)).astype(np.float32)
    if isinstance(inputs, np.ndarray):
        return inputs.astype(np.float32)
    p = Path(inputs)
    if p.is_dir():
        return _load_images(p, spec)
    try:
        data = np.load(p)
    except Exception as exc:
        raise VerificationError(f"{p}: cannot read inputs ({exc}); give a .npy/.npz NHWC batch or a folder of images") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        key = "x" if "x" in data.files else data.files[0]
        data = data[key]
    if data.ndim != 4 or data.shape[-1] not in (1, 3):
        raise VerificationError(f"{p}: inputs have shape {data.shape}; expected NHWC (batch, height, width, channels)")
    return data.astype(np.float32)


def _load_images(folder: Path, spec: dict[str, Any]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise VerificationError("reading an image folder needs Pillow: pip install pillow") from None
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    if not files:
        raise VerificationError(f"{folder} holds no .png/.jpg images")
    size = spec["size"]
    arrs = [np.asarray(Image.open(f).convert("RGB").resize((size, size)), np.float32) for f in files]
    x = np.stack(arrs)
    lo, hi = spec["range"]
    return (x / 255.0 * (hi - lo) + lo).astype(np.float32)  # pixels mapped into the table's input domain


def _run_keras(src: Path, taps: list[tuple[str, str]], x: np.ndarray, *, train_step: bool, device: str,
               mapping: str | None, source_model: str | None, fmt: str | None, workdir: Path) -> Path:
    inputs = workdir / "inputs.npy"
    np.save(inputs, x)
    (workdir / "taps.json").write_text(json.dumps(taps))
    out = workdir / "reference.safetensors"
    cmd = [sys.executable, "-m", "converter.keras_runner", "--src", str(src), "--inputs", str(inputs),
           "--taps", str(workdir / "taps.json"), "--out", str(out), "--device", "cpu" if device == "cpu" else "auto"]
    for flag, val in (("--mapping", mapping), ("--source-model", source_model), ("--format", fmt)):
        if val:
            cmd += [flag, str(val)]
    if train_step:
        cmd.append("--train-step")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
        if proc.returncode < 0:
            last = f"the Keras process died with signal {-proc.returncode}"
        raise VerificationError(f"running the Keras source {src} failed: {last.removeprefix('error: ')}")
    return out


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise VerificationError("--device cuda: PyTorch sees no CUDA device; use --device cpu or auto")
    return device


def verify(
    src: str | os.PathLike | None,
    converted: str | os.PathLike,
    *,
    inputs: str | os.PathLike | np.ndarray | None = None,
    batch: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    atol: float = 0.0,
    train_step: bool = False,
    device: str = "auto",
    record: str | os.PathLike | None = None,
    against: str | os.PathLike | None = None,
    mapping: str | os.PathLike | None = None,
    source_model: str | None = None,
    format: str | None = None,
    force: bool = False,
) -> VerificationReport:
    """Compare the converted model with its Keras source, layer by layer.

    ``against``: a reference recorded earlier with ``record`` (no TensorFlow needed then; ``src``
    may be None). The Keras side always runs in a separate process (TensorFlow and torchvision do
    not share one here); if this process already loaded TensorFlow, the whole check runs in a
    clean one. Tolerance: a layer passes when ``rms(error) / rms(reference) <= rtol`` (float32
    default 1e-4) or ``max_abs <= atol``; max abs error, max abs / RMS and cosine are reported too.
    """
    from .model import import_torch_side, torch_side_hazard

    if torch_side_hazard():  # TF is loaded here: torchvision would crash this process, so isolate
        return _verify_in_subprocess(src, converted, inputs=inputs, batch=batch, seed=seed, rtol=rtol, atol=atol,
                                     train_step=train_step, device=device, record=record, against=against,
                                     mapping=mapping, source_model=source_model, format=format, force=force)
    import_torch_side()
    import torch

    from .model import load_model, read_converted

    _, meta = read_converted(converted)
    bn_config = json.loads(meta.get("bn_config", "{}"))
    preprocessing = json.loads(meta.get("preprocessing", "{}"))
    dev = _resolve_device(device)
    timings: dict[str, float] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ckptport-verify-") as tmp:
        if against is not None:
            ref_path = Path(against)
            ref_raw = formats.read(ref_path)
            if "ckptport.reference" not in ref_raw.metadata:
                raise VerificationError(f"{ref_path} is not a reference recorded by `ckptport verify --record`")
            if ref_raw.metadata.get("source.sha256") and meta.get("source.sha256") and \
                    ref_raw.metadata["source.sha256"] != meta["source.sha256"]:
                notes.append("the reference was recorded from a different source file than this conversion")
            if train_step and not ref_raw.metadata.get("train_step"):
                raise VerificationError(f"{ref_path} was recorded without --train-step; record it again with it")
        else:
            if src is None:
                raise VerificationError("give the Keras source, or --against a recorded reference")
            from .pipeline import convert

            result = convert(src, meta["target"], mapping=mapping, source_model=source_model, format=format)
            from .tables import builtin_tables, load_table

            table = load_table(mapping) if mapping else next(t for t in builtin_tables() if t.id == result.table_id)
            spec = dict(table.input)
            fixed = result.source_input_shape
            if fixed and fixed[0] and fixed[1]:
                if fixed[0] != fixed[1]:
                    spec["hw"] = (fixed[0], fixed[1])
                spec["size"] = fixed[0]  # the source model declares a fixed input size: use it
            x = _make_inputs(inputs, spec, batch, seed)
            t0 = time.perf_counter()
            ref_path = _run_keras(Path(src), result.taps, x, train_step=train_step, device=dev, mapping=mapping,
                                  source_model=source_model, fmt=format, workdir=Path(tmp))
            timings["source_process_s"] = time.perf_counter() - t0
            ref_raw = formats.read(ref_path)
        ref = {k: t.load() for k, t in ref_raw.tensors.items()}
        rmeta = dict(ref_raw.metadata)
        timings["source_run_s"] = float(rmeta.get("timing.source_run_s", "nan"))
        if record is not None:
            formats.write(record, ref, rmeta, format="safetensors", force=force)
    taps = [tuple(t) for t in json.loads(rmeta["taps"])]
    x = ref["input"]
    rtol = DEFAULT_RTOL["float32"] if rtol is None else rtol
    model = load_model(converted, device=dev)
    xt = x.astype(np.float64)
    if preprocessing.get("steps"):
        xt = xt * np.asarray(preprocessing["scale"]) + np.asarray(preprocessing["offset"])
    xt = torch.from_numpy(xt.astype(np.float32)).permute(0, 3, 1, 2).contiguous().to(dev)
    modules = dict(model.named_modules())
    missing = [m for _, m in taps if m not in modules]
    if missing:
        raise VerificationError(f"the converted model has no modules {missing[:5]}; was it converted with this table?")
    with torch.no_grad():
        t0 = time.perf_counter()
        model(xt)
        timings["target_run_s"] = time.perf_counter() - t0
        captured: dict[str, torch.Tensor] = {}
        hooks = [modules[m].register_forward_hook(_capture(captured, m)) for m in dict.fromkeys(m for _, m in taps)]
        t0 = time.perf_counter()
        out = model(xt)
        timings["target_run_with_taps_s"] = time.perf_counter() - t0
        for h in hooks:
            h.remove()
    timings["tap_overhead_s"] = timings["target_run_with_taps_s"] - timings["target_run_s"]
    layers: list[LayerResult] = []
    for i, (src_layer, mod) in enumerate(taps):
        k = _to_torch_layout(ref[f"tap/{i}"])
        t = captured[mod].cpu().numpy()
        if k.shape != t.shape:
            if k.size == t.size:
                k = k.reshape(t.shape)
            else:
                layers.append(LayerResult(i, src_layer, mod, list(t.shape), float("inf"), float("inf"), 0.0, False,
                                          float("inf")))
                continue
        max_abs, rel, cos, max_rel = _metrics(k, t)
        layers.append(LayerResult(i, src_layer, mod, list(t.shape), max_abs, rel, cos, max_abs <= atol or rel <= rtol,
                                  max_rel))
    final = rmeta.get("final_activation", "linear")
    logits = out.detach().cpu().numpy()
    compared = "logits"
    if final == "softmax":
        logits = torch.softmax(out.detach().double(), dim=-1).cpu().numpy()
        compared = "probabilities"
        notes.append("the Keras model ends in softmax: probabilities are compared on both sides")
    max_abs, rel, cos, max_rel = _metrics(ref["logits"], logits)
    output = {"max_abs": max_abs, "rel": rel, "max_rel": max_rel, "cosine": cos, "passed": max_abs <= atol or rel <= rtol}
    first = next((r for r in layers if not r.passed), None)
    passed = output["passed"] and first is None
    report = VerificationReport(passed, None, layers, output, rtol, atol, int(x.shape[0]), list(x.shape), compared,
                                timings=timings, device=dev, notes=notes)
    if first is not None:
        report.first_divergent = {"index": first.index, "source_layer": first.source_layer,
                                  "target_module": first.target_module, "rel": first.rel, "max_abs": first.max_abs}
    elif not output["passed"]:
        report.first_divergent = {"index": len(layers), "source_layer": "(model output)", "target_module": "(model output)",
                                  "rel": rel, "max_abs": max_abs}
    if train_step:
        report.train_step = _train_step(model, xt, ref, json.loads(rmeta["train_step"]), bn_config, rtol)
        report.train_step_passed = all(r.passed for r in report.train_step)
        report.passed = report.passed and report.train_step_passed
        if report.first_divergent is None and not report.train_step_passed:
            bad = next(r for r in report.train_step if not r.passed)
            report.first_divergent = {"index": None, "source_layer": bad.source_layer, "target_module": bad.target_module,
                                      "rel": max(bad.mean_rel, bad.var_rel), "max_abs": None, "stage": "train-step"}
        report.notes.append(
            "train step: PyTorch updates running_var with the unbiased batch variance (n/(n-1)), Keras with the "
            "biased one; the comparison adds exactly p*var_biased/(n-1) to the Keras value (var_rel), the naive gap "
            "is shown as var_rel_uncorrected"
        )
    return report


def _verify_in_subprocess(src, converted, *, inputs, batch, seed, rtol, atol, train_step, device, record, against,
                          mapping, source_model, format, force) -> VerificationReport:
    """The same verification in a clean process (used when this one already loaded TensorFlow)."""
    with tempfile.TemporaryDirectory(prefix="ckptport-verify-") as tmp:
        if isinstance(inputs, np.ndarray):
            np.save(Path(tmp) / "inputs.npy", inputs)
            inputs = Path(tmp) / "inputs.npy"
        args = [sys.executable, "-m", "converter", "verify"] + ([str(src)] if src is not None else []) + [str(converted)]
        opts = {"--inputs": inputs, "--batch": batch, "--seed": seed, "--rtol": rtol, "--atol": atol,
                "--device": device, "--record": record, "--against": against, "--mapping": mapping,
                "--source-model": source_model}
        args += [x for k, v in opts.items() if v is not None for x in (k, str(v))]
        args += ["--train-step"] if train_step else []
        args += ["--force"] if force else []
        if format:
            raise VerificationError("format= is not supported when TensorFlow is already imported here")
        proc = subprocess.run(args + ["--json"], capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise VerificationError(proc.stderr.strip().splitlines()[-1].removeprefix("error: ") if proc.stderr.strip()
                                else f"verification process failed ({proc.returncode})")
    return report_from_dict(json.loads(proc.stdout))


def report_from_dict(d: dict[str, Any]) -> VerificationReport:
    """Rebuild a report from ``to_dict()`` / ``--json`` output."""
    d = dict(d)
    d["layers"] = [LayerResult(**r) for r in d["layers"]]
    if d.get("train_step") is not None:
        d["train_step"] = [BNStepResult(**r) for r in d["train_step"]]
    return VerificationReport(**d)


def _capture(store: dict, name: str):
    def hook(module, inputs, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        store[name] = out.detach().clone()  # clone: in-place ops (ReLU(inplace=True)) follow

    return hook


def _train_step(model, xt, ref: dict[str, np.ndarray], bn_info: dict[str, Any], bn_config: dict[str, Any],
                rtol: float) -> list[BNStepResult]:
    """One forward pass with only BatchNorm in training mode, on both sides; compare the updates.

    Updates (after - before) are compared, not raw stats: a conv bias folded into running_mean shifts
    the PyTorch stats by the bias before and after alike. PyTorch's variance update uses the unbiased
    batch variance, Keras' the biased one: the expected PyTorch update adds exactly
    (1 - m) * var_biased / (n - 1). An error passes when it is within ``STEP_TOL`` of the update's
    RMS plus a float32 rounding floor (1e-6 of the statistic's RMS).
    """
    import torch

    model.eval()
    bn_mods = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    before = {n: (m.running_mean.detach().cpu().double().numpy().copy(),
                  m.running_var.detach().cpu().double().numpy().copy()) for n, m in bn_mods.items()}
    for m in bn_mods.values():
        m.train()
    with torch.no_grad():
        model(xt)
    model.eval()
    by_source = {cfg["source_layer"]: mod for mod, cfg in bn_config.items()}
    results = []
    for layer, info in bn_info.items():
        if layer not in by_source:
            continue
        mod_name = by_source[layer]
        mod = bn_mods[mod_name]
        n, m = info["n"], info["momentum"]
        g = lambda k: ref[f"bn/{layer}/{k}"].astype(np.float64)  # noqa: E731
        dk_mean = g("moving_mean_after") - g("moving_mean_before")
        dk_var = g("moving_var_after") - g("moving_var_before")
        dk_var_torch = dk_var + (1.0 - m) * g("batch_var") / (n - 1)  # Bessel, exactly
        t_mean = mod.running_mean.detach().cpu().double().numpy()
        t_var = mod.running_var.detach().cpu().double().numpy()
        dt_mean, dt_var = t_mean - before[mod_name][0], t_var - before[mod_name][1]

        def rel(got, want, scale_stat):
            allowed_unit = np.sqrt(np.mean(want**2)) + 1e-6 / STEP_TOL * np.sqrt(np.mean(scale_stat**2)) + 1e-30
            return float(np.abs(got - want).max() / allowed_unit)

        mean_rel = rel(dt_mean, dk_mean, g("moving_mean_after"))
        var_rel = rel(dt_var, dk_var_torch, g("moving_var_after"))
        var_unc = rel(dt_var, dk_var, g("moving_var_after"))
        ok = mean_rel <= STEP_TOL and var_rel <= STEP_TOL
        results.append(BNStepResult(layer, mod_name, m, float(mod.momentum), n, mean_rel, var_rel, var_unc, ok))
    return results


STEP_TOL = 1e-2  # allowed error of a BN update, relative to the update itself
