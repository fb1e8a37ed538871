"""Benchmarks (not tests): the numbers of issue 12, side by side in one run (`make bench`).

    python benchmarks/run.py                     # every section; writes benchmarks/results.json
    python benchmarks/run.py convert peer        # some: convert peer big batch help verify
    python benchmarks/run.py verify --device cuda  # the verification split on a GPU
    python benchmarks/run.py --update-doc        # ... and writes the tables into docs/benchmarks.md
    python benchmarks/run.py --markdown [--update-doc]  # no measuring: the tables of results.json

Sections:
  convert  `ckptport convert` vs the plain copy (h5py reads every dataset, safetensors.numpy
           save_file writes them) on ResNet101 and EfficientNetB7 .weights.h5, alternated run by
           run (A B B A ...), medians of N; goals: wall time <= 1.5x the copy, peak RSS <= the
           copy's
  peer     the path a user takes today: Keras load_model -> tf2onnx -> onnx2torch -> torch.save
           (benchmarks/peer_path.py, one process) on the same models' .keras
  big      a 2 GiB+ Dense-heavy custom .keras (benchmarks/big_fixture.py) onto the user's module
           (benchmarks/big_dense.py:factory), --no-verify; goal: peak RSS < 600 MiB
  batch    benchmarks/batch_throughput.py's bench_batch() when it exists (skipped with a note)
  help     `ckptport --help` start-up
  verify   ResNet50 verification at batch 8: source / target / tap overhead (--device cpu|cuda)

Every command is timed as a whole process; peak RSS is the largest maximum resident set of the
process and of any process it started and waited for (getrusage RUSAGE_CHILDREN of the measuring
process: Linux reports the largest single descendant, not a sum). Fixtures are built on demand (seeded, random weights) under --fixtures
(default $CKPTPORT_BENCH_FIXTURES or out/bench).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CACHE = Path(os.environ.get("CKPTPORT_BENCH_FIXTURES", ROOT / "out" / "bench"))
RESULTS = ROOT / "benchmarks" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
SECTIONS = ["convert", "peer", "big", "batch", "help", "verify"]

_MEASURE = """
import resource, subprocess, sys, time, json
t = time.perf_counter()
try:
    p = subprocess.run(json.loads(sys.argv[1]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=float(sys.argv[2]))
    rc, out, err = p.returncode, p.stdout, p.stderr
except subprocess.TimeoutExpired as e:
    rc, out, err = "timeout", "", f"timed out after {sys.argv[2]} s"
wall = time.perf_counter() - t
lines = lambda s: [l for l in s.splitlines() if l.strip()]
print(json.dumps({"rc": rc, "wall_s": wall,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "stdout_last": (lines(out) or [""])[-1],
                  "stderr_last": (lines(err) or [""])[-1]}))
"""

_PLAIN = """
import sys, h5py, numpy as np
from safetensors.numpy import save_file
src, dst = sys.argv[1], sys.argv[2]
out = {}
def keep(name, obj):
    if isinstance(obj, h5py.Dataset):
        out[name] = np.ascontiguousarray(obj[()])
with h5py.File(src, "r") as f:
    f.visititems(keep)
save_file(out, dst)
"""


def measure_once(cmd: list[str], timeout: float = 1800) -> dict:
    """One whole-process run of ``cmd``: rc, wall_s, peak_rss_mib, the last stdout/stderr lines."""
    proc = subprocess.run(
        [PY, "-c", _MEASURE, json.dumps(cmd), str(timeout)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"the measuring process failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def summarize(rows: list[dict]) -> dict:
    """Median, min and max of wall time and peak RSS; a failure's rc and last stderr line."""
    out = {
        k: {
            "median": statistics.median(r[k] for r in rows),
            "min": min(r[k] for r in rows),
            "max": max(r[k] for r in rows),
        }
        for k in ("wall_s", "peak_rss_mib")
    }
    out["runs"] = len(rows)
    failed = [r for r in rows if r["rc"] != 0]
    if failed:
        rc = failed[0]["rc"]
        killed = f"killed by signal {-rc}" if isinstance(rc, int) and rc < 0 else ""
        out["failed"] = {"rc": rc, "error": failed[0]["stderr_last"] or killed}
    if rows[-1]["stdout_last"].startswith("{"):
        out["report"] = json.loads(rows[-1]["stdout_last"])
    return out


def measure(cmd: list[str], runs: int = 5, warmup: int = 1, timeout: float = 1800) -> dict:
    """``runs`` whole-process runs of one command after ``warmup`` discarded ones."""
    rows = [measure_once(cmd, timeout) for _ in range(warmup + runs)]
    return summarize(rows[warmup:])


def alternate(cmds: dict[str, list[str]], runs: int = 5, warmup: int = 1) -> dict:
    """The commands run in turn, in A B, B A order on alternate rounds (so a drifting machine
    load hits both alike); each summarized, plus the per-round ratios of each to the first."""
    rows: dict[str, list[dict]] = {name: [] for name in cmds}
    for i in range(warmup + runs):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in order:
            row = measure_once(cmds[name])
            if i >= warmup:
                rows[name].append(row)
    out = {name: summarize(r) for name, r in rows.items()}
    base = next(iter(cmds))
    for name in list(cmds)[1:]:
        ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(rows[base], rows[name])]
        out[f"{base}/{name}"] = {
            "median": statistics.median(ratios),
            "min": min(ratios),
            "max": max(ratios),
        }
    return out


def fixture(build: str, fmt: str, size: int = 224, rng: str = "-128,128") -> Path:
    """A seeded random-weight keras.applications model in one format, built once under CACHE."""
    out = CACHE / f"{build}-{fmt}"
    if not (out / "files.json").exists():
        print(f"building fixture {out} (once)", file=sys.stderr)
        args = ["--build", build, "--out", str(out), "--formats", fmt, "--size", str(size)]
        script = str(ROOT / "fixtures" / "keras_models.py")
        subprocess.run([PY, script, *args, f"--range={rng}"], check=True, capture_output=True)
    return Path(json.loads((out / "files.json").read_text())["files"][fmt])


def big_fixture(tiny: bool = False) -> Path:
    """The 2 GiB+ Dense-heavy custom .keras of benchmarks/big_fixture.py (or its width-64 twin),
    built once."""
    out = CACHE / ("big-dense-tiny" if tiny else "big-dense")
    if not (out / "big.keras").exists():
        print(f"building the fixture {out} (once; the 2 GiB one takes ~2 min)", file=sys.stderr)
        script = str(ROOT / "benchmarks" / "big_fixture.py")
        args = [PY, script, "--out", str(out), *(["--tiny"] if tiny else [])]
        subprocess.run(args, check=True, capture_output=True)
    return out / "big.keras"


def ckptport(*args: str) -> list[str]:
    return [PY, "-m", "converter", *args]


MODELS = ["ResNet101", "EfficientNetB7"]


def bench_convert(runs: int) -> dict:
    out = {}
    for name in MODELS:
        src = fixture(name, "weights.h5")
        with tempfile.TemporaryDirectory() as tmp:
            cmds = {
                "ckptport_convert": ckptport(
                    "convert", str(src), "-o", f"{tmp}/a.safetensors", "--force"
                ),
                "plain_copy": [PY, "-c", _PLAIN, str(src), f"{tmp}/b.safetensors"],
            }
            out[name] = {"source_mib": src.stat().st_size / 2**20, **alternate(cmds, runs)}
    return out


def bench_peer(runs: int) -> dict:
    out = {}
    for name in MODELS:
        src = fixture(name, "keras")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [PY, str(ROOT / "benchmarks" / "peer_path.py"), str(src), f"{tmp}/m.pt"]
            out[name] = {"source_mib": src.stat().st_size / 2**20, **measure(cmd, runs, 0)}
    return out


def bench_big(runs: int) -> dict:
    """The 2 GiB+ source onto the user's module: drafting the mapping, then again with the drafted
    table (--mapping); the same at width 64 and the torch imports alone (the part of the peak that
    does not grow with the checkpoint)."""
    out = {}
    module = ROOT / "benchmarks" / "big_dense.py"
    with tempfile.TemporaryDirectory() as tmp:
        for name, tiny, factory in [("big.keras", False, "factory"), ("tiny", True, "tiny")]:
            src, dst = big_fixture(tiny), f"{tmp}/{name.split('.')[0]}"
            args = ["convert", str(src), "--to", f"{module}:{factory}", "--no-verify", "--force"]
            res = measure(ckptport(*args, "-o", f"{dst}.safetensors"), runs, 0)
            out[name] = {"source_mib": src.stat().st_size / 2**20, **res}
            again = ckptport(*args, "--mapping", f"{dst}.mapping.toml", "-o", f"{dst}2.safetensors")
            out[f"{name} --mapping"] = {
                "source_mib": out[name]["source_mib"],
                **measure(again, runs, 0),
            }
    floors = {  # the child that traces the module imports torch alone and skips the teardown
        "import torch": "import torch",
        "import torch, os._exit": "import torch, os; os._exit(0)",
        "import torch, torchvision": "import torch, torchvision",
    }
    for name, code in floors.items():
        out[name] = {"source_mib": 0, **measure([PY, "-c", code], runs, 0)}
    return out


def bench_batch(runs: int, files: int = 50) -> dict:
    """Issue 12's 50 epochs of a ResNet50 run: benchmarks/batch_throughput.py (helper "batch")
    converts them one process per file and as one `ckptport convert DIR` per --jobs value."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import batch_throughput
    except ImportError:
        return {"skipped": "benchmarks/batch_throughput.py is not on this branch yet"}
    src = fixture("ResNet50", "weights.h5")
    return batch_throughput.bench_batch(src, n=files, rounds=runs, workdir=CACHE)


def bench_help(runs: int) -> dict:
    return {"ckptport --help": measure(ckptport("--help"), runs=2 * runs)}


def bench_verify(runs: int, device: str = "cpu", batch: int = 8) -> dict:
    """In this process (torchvision imported first; the Keras side runs in its own process)."""
    src = fixture("ResNet50", "keras")
    sys.path.insert(0, str(ROOT))
    import torch
    import torchvision  # noqa: F401

    import converter
    from converter.pipeline import convert_file

    with tempfile.TemporaryDirectory() as tmp:
        out = convert_file(src, f"{tmp}/m.safetensors")[1]
        timings = [
            converter.verify(src, out, batch=batch, device=device).timings for _ in range(runs)
        ]
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "CPU"
    medians = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    return {"batch": batch, "input": "224x224", "device": device, "device_name": name, **medians}


def machine() -> dict:
    """Where and what was measured: date, CPU, memory, versions, the commit."""
    cpu = next(
        (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
        platform.processor(),
    )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
    versions = {
        p: importlib.metadata.version(p)
        for p in (
            "torch",
            "tensorflow-cpu",
            "keras",
            "h5py",
            "safetensors",
            "tf2onnx",
            "onnx2torch",
        )
        if _installed(p)
    }
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "versions": versions,
        "commit": subprocess.run(git, capture_output=True, text=True).stdout.strip(),
    }


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


BENCHES = {
    "convert": bench_convert,
    "peer": bench_peer,
    "big": bench_big,
    "batch": bench_batch,
    "help": bench_help,
}


def run(sections: list[str], runs: int, peer_runs: int, device: str) -> dict:
    """Each section's numbers with where, when and at which commit they were measured."""
    results = {}
    for name in sections:
        print(f"benchmark: {name}", file=sys.stderr)
        n = {"peer": peer_runs, "big": peer_runs, "verify": 3, "batch": 2}.get(name, runs)
        where, load = machine(), os.getloadavg()[0]
        data = bench_verify(n, device) if name == "verify" else BENCHES[name](n)
        where.update(runs=n, load_1m=[round(load, 1), round(os.getloadavg()[0], 1)])
        key = f"{name}_{device}" if name == "verify" and device != "cpu" else name  # keep both
        results[key] = {"measured": where, **data}
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sections", nargs="*", metavar="SECTION", help=", ".join(SECTIONS))
    ap.add_argument("--runs", type=int, default=5, help="alternated runs per command (convert)")
    ap.add_argument("--peer-runs", type=int, default=2, help="runs of the peer and big commands")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="verify's device")
    ap.add_argument("--fixtures", type=Path, default=CACHE, help="where fixtures are built")
    ap.add_argument("--json", type=Path, default=RESULTS, help="results file (written / read)")
    ap.add_argument("--markdown", action="store_true", help="only print the tables of --json")
    ap.add_argument("--update-doc", action="store_true", help="write the tables into " + str(DOC))
    args = ap.parse_args(argv)
    if set(args.sections) - set(SECTIONS):
        unknown = sorted(set(args.sections) - set(SECTIONS))
        ap.error(f"unknown sections {unknown}; valid: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure (unless --markdown), merge into the results file section by section, print the
    tables (or write them into the doc with --update-doc)."""
    global CACHE
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_report

    if not args.markdown:
        CACHE = args.fixtures
        results = run(args.sections or SECTIONS, args.runs, args.peer_runs, args.device)
        previous = json.loads(args.json.read_text()) if args.json.exists() else {}
        args.json.write_text(json.dumps({**previous, **results}, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    results = json.loads(args.json.read_text())
    print(bench_report.markdown(results))
    if args.update_doc:
        bench_report.update_doc(DOC, results)
        print(f"updated {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
