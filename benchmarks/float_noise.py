"""Float32 noise of a converted family: Keras logits vs PyTorch float32 and float64 on the same
converted weights; the largest per-layer float32 self-noise at verification's taps (RMS error /
RMS, the metric `ckptport verify` applies its rtol to); and what the table's surgeries are worth
(logits error without them).

    CKPTPORT_TEST_CACHE=/work/fixture-cache python benchmarks/float_noise.py keras:InceptionV3 ...

Uses the test suite's fixtures (tests/conftest.py: randomized Keras model, the table's [input]).
Numbers go to docs/benchmarks.md (Accuracy section).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from helpers import keras_build_args, make_keras_fixture, rel_err, torch_logits  # noqa: E402

import converter  # noqa: E402
from converter.model import build_target, load_model  # noqa: E402


def measure(source_id: str, tmp: Path) -> dict[str, float]:
    fn, kwargs, inp = keras_build_args(source_id)
    fx = make_keras_fixture(fn, kwargs, inp, ["keras"])
    result = converter.convert(fx["files"]["keras"])
    model = load_model(result.save(tmp / f"{fn}.safetensors", force=True))
    y32 = torch_logits(model, fx["x"], result.preprocessing)
    y64 = torch_logits(model.double(), fx["x"], result.preprocessing, dtype=torch.float64)
    row = {
        "keras_vs_torch32": rel_err(y32, fx["logits"]),
        "torch32_vs_torch64": rel_err(y32, y64),
        "keras_vs_torch64": rel_err(y64, fx["logits"]),
    }
    row["max_tap_rms_rel_torch32_vs_torch64"] = tap_noise(model, fx["x"], result)
    if result.surgeries:  # the same weights in the plain target, no surgery
        plain = build_target(result.target, **result.target_kwargs)
        plain.load_state_dict(result.torch_state_dict(), strict=True)
        for name, bn in result.bn_config.items():
            mod = dict(plain.named_modules())[name]
            mod.eps, mod.momentum = bn["eps"], bn["momentum"]
        row["keras_vs_torch32_without_surgeries"] = rel_err(
            torch_logits(plain.eval(), fx["x"], result.preprocessing), fx["logits"]
        )
    return row


def tap_noise(model, x, result) -> float:
    """Largest RMS(float32 - float64) / RMS(float64) over the modules verification taps."""
    import numpy as np

    mods = dict(model.named_modules())
    worst = 0.0
    outs: dict[str, list] = {}
    hooks = [
        mods[m].register_forward_hook(
            lambda mod, i, o, m=m: outs.setdefault(m, []).append(o.double().clone())
        )
        for m in dict.fromkeys(m for _, m in result.taps)
    ]
    for dtype in (torch.float64, torch.float32):
        torch_logits(model.to(dtype), x, result.preprocessing, dtype=dtype)
    for h in hooks:
        h.remove()
    for y64, y32 in outs.values():
        err, ref = (y32 - y64).numpy(), y64.numpy()
        worst = max(worst, float(np.sqrt((err**2).mean()) / np.sqrt((ref**2).mean())))
    return worst


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for sid in argv or ["keras:Xception", "keras:InceptionV3"]:
            row = measure(sid, Path(tmp))
            print(sid, " ".join(f"{k}={v:.2e}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
