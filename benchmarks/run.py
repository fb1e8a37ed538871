"""Benchmarks (not tests): numbers a user asks for. Results go to docs/benchmarks.md.

    python benchmarks/run.py convert   # ResNet101 .weights.h5 -> safetensors vs plain h5py + safetensors
    python benchmarks/run.py help      # `ckptport --help` start-up time
    python benchmarks/run.py verify    # ResNet50 verification at batch 8: source / target / tap overhead

Each command is timed as a whole process, several runs after a warm-up; peak RSS is the process's
own maximum resident set (getrusage of the child). Medians are quoted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CACHE = ROOT / "out" / "bench"

_MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
rc = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

_PLAIN = """
import sys, h5py, numpy as np
from safetensors.numpy import save_file
src, dst = sys.argv[1], sys.argv[2]
out = {}
with h5py.File(src, "r") as f:
    f.visititems(lambda name, obj: out.__setitem__(name, np.ascontiguousarray(obj[()])) if isinstance(obj, h5py.Dataset) else None)
save_file(out, dst)
"""


def measure(cmd: list[str], runs: int = 5, warmup: int = 1) -> dict:
    rows = []
    for i in range(warmup + runs):
        proc = subprocess.run([PY, "-c", _MEASURE, json.dumps(cmd)], capture_output=True, text=True, check=True)
        row = json.loads(proc.stdout)
        if row["rc"] != 0:
            raise SystemExit(f"benchmark command failed: {cmd}")
        if i >= warmup:
            rows.append(row)
    return {k: {"median": statistics.median(r[k] for r in rows), "min": min(r[k] for r in rows),
                "max": max(r[k] for r in rows)} for k in ("wall_s", "peak_rss_mib")}


def fixture(build: str, fmt: str, size: int = 224, rng: str = "-128,128") -> Path:
    out = CACHE / f"{build}-{fmt}"
    if not (out / "files.json").exists():
        subprocess.run([PY, str(ROOT / "fixtures" / "keras_models.py"), "--build", build, "--out", str(out),
                        "--formats", fmt, "--size", str(size), f"--range={rng}"], check=True, capture_output=True)
    return Path(json.loads((out / "files.json").read_text())["files"][fmt])


def bench_convert() -> dict:
    src = fixture("ResNet101", "weights.h5")
    with tempfile.TemporaryDirectory() as tmp:
        ours = measure([PY, "-m", "converter", "convert", str(src), "-o", f"{tmp}/a.safetensors", "--force"])
        plain = measure([PY, "-c", _PLAIN, str(src), f"{tmp}/b.safetensors"])
    return {"source": str(src.name), "source_mib": src.stat().st_size / 2**20, "ckptport_convert": ours,
            "plain_h5py_safetensors": plain}


def bench_help() -> dict:
    return {"ckptport --help": measure([PY, "-m", "converter", "--help"], runs=10)}


def bench_verify(batch: int = 8) -> dict:
    src = fixture("ResNet50", "keras")
    sys.path.insert(0, str(ROOT))
    import torchvision  # noqa: F401

    import converter

    with tempfile.TemporaryDirectory() as tmp:
        out = converter.convert(src).save(f"{tmp}/m.safetensors")
        runs = [converter.verify(src, out, batch=batch, device="cpu").timings for _ in range(3)]
    keys = runs[0].keys()
    return {"batch": batch, "input": "224x224", **{k: statistics.median(r[k] for r in runs) for k in keys}}


def main() -> int:
    what = sys.argv[1:] or ["convert", "help", "verify"]
    results = {}
    for w in what:
        results[w] = {"convert": bench_convert, "help": bench_help, "verify": bench_verify}[w]()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
