"""Batch throughput (issue 12, part 2): N copies of one checkpoint (a training run's epochs: one
structure) converted one process per file, as a user does today, vs ``ckptport convert DIR -o OUT``
with --jobs 1 and 2. A benchmark, not a test: numbers go to docs/benchmarks.md.

    python benchmarks/batch_throughput.py [--n 30] [--jobs 1,2] [--source F] [--workdir DIR]

``bench_batch(source, ...) -> dict`` is what benchmarks/run.py calls. Each variant is timed as
whole processes (wall clock; CPU time, user + system, of every process, which other users of a
shared machine do not inflate as they do the wall clock; peak RSS of the largest process: getrusage
of the children, workers included); the variants alternate over ``rounds``, medians are quoted. Every variant's outputs
are checked byte for byte against the one-process-per-file outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_SOURCE = ROOT / "out" / "bench" / "ResNet50-weights.h5" / "model.weights.h5"

# runs the commands given (a JSON list of argv lists) one after the other in a child of its own,
# so that the peak RSS of its children is the peak of this variant alone
_TIMED = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
codes = [subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
         for cmd in json.loads(sys.argv[1])]
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu, rss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
print(json.dumps({"codes": codes, "wall_s": wall, "cpu_s": cpu, "peak_rss_mib": rss}))
"""


def _timed(commands: list[list[str]]) -> dict:
    proc = subprocess.run(
        [PY, "-c", _TIMED, json.dumps(commands)], capture_output=True, text=True, check=True
    )
    row = json.loads(proc.stdout)
    if any(row.pop("codes")):
        raise SystemExit(f"a benchmark command failed: {commands[0]} ...")
    return row


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _variants(sources: list[Path], out: Path, jobs: tuple[int, ...]) -> dict[str, list]:
    """Each variant's commands (argv lists), writing into ``out``."""
    from converter.batch import output_name

    ckptport = [PY, "-m", "converter", "convert"]
    per_file = [[*ckptport, str(src), "-o", str(out / output_name(src))] for src in sources]
    variants = {
        "one process per file": per_file,
        # what the batch's direct output I/O alone gives (a single file's auto is buffered)
        DIRECT_BASE: [
            [*cmd, "--output-io", "direct"] for cmd in per_file
        ],
    }
    for n in jobs:
        batch = [*ckptport, str(sources[0].parent), "-o", str(out), "--jobs", str(n)]
        variants[f"batch --jobs {n}"] = [batch]
    return variants


def _run_variant(commands: list[list[str]], out: Path) -> tuple[dict, dict[str, str]]:
    """Time one variant into an empty ``out``; its timing and its outputs' digests. The disk is
    synced first: the sources were copied and the last variant's outputs deleted just before,
    and their writeback (and the discards of the deleted blocks) would otherwise be charged to
    this variant; a training run's checkpoints are on disk long before they are converted."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    os.sync()
    row = _timed(commands)
    digests = {p.name: _sha(p) for p in sorted(out.iterdir())}
    shutil.rmtree(out)
    return row, digests


def bench_batch(
    source: Path = DEFAULT_SOURCE,
    n: int = 30,
    jobs: tuple[int, ...] = (1, 2),
    rounds: int = 1,
    workdir: Path | None = None,
) -> dict:
    """Convert ``n`` copies of ``source`` (a ``.weights.h5``) one process per file and as one batch
    per ``jobs``; per variant: median wall time, files per second, peak RSS, speed-up over one
    process per file, and whether its outputs are the per-file outputs byte for byte."""
    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-", dir=workdir))
    io = _output_io(source, n)  # what --output-io auto decides, as the runs start
    load = [os.getloadavg()[0]]
    try:
        run = tmp / "run"
        run.mkdir()
        sources = [run / f"epoch_{k:03d}.weights.h5" for k in range(1, n + 1)]
        for path in sources:
            shutil.copyfile(source, path)
        variants = _variants(sources, tmp / "out", jobs)
        rows: dict[str, list[dict]] = {name: [] for name in variants}
        digests: dict[str, dict[str, str]] = {}
        for _ in range(rounds):  # the variants alternate: the machine's load hits each alike
            for name, commands in variants.items():
                row, digests[name] = _run_variant(commands, tmp / "out")
                rows[name].append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _summary(source, n, rows, digests)
    result["output_io"] = io
    load.append(os.getloadavg()[0])
    result["load_avg_1m"] = [round(x, 2) for x in load]  # before, after (other users of the CPUs)
    result["cpus"] = os.cpu_count()
    return result


def _output_io(source: Path, n: int) -> dict:
    """What ``--output-io auto`` chose for the batch and for one file (formats.direct_io)."""
    from converter.formats import direct_io

    size = source.stat().st_size
    mode = {True: "direct", False: "buffered"}
    return {
        "batch": mode[direct_io.choose("auto", n * size)],
        "single": mode[direct_io.choose("auto", size)],
        "total_gib": n * size / 2**30,
        "dirty_background_gib": direct_io.dirty_background_bytes() / 2**30,
    }


DIRECT_BASE = "one process per file, --output-io direct"


def _summary(source: Path, n: int, rows: dict, digests: dict) -> dict:
    base = "one process per file"
    walls = {name: statistics.median(r["wall_s"] for r in runs) for name, runs in rows.items()}
    direct = walls.get(DIRECT_BASE)
    return {
        "source": str(source),
        "source_mib": round(source.stat().st_size / 2**20, 1),
        "files": n,
        "rounds": len(rows[base]),
        "variants": {
            name: {
                "wall_s": round(walls[name], 2),
                "runs_s": [round(r["wall_s"], 2) for r in runs],
                "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
                "files_per_s": round(n / walls[name], 2),
                "speedup": round(walls[base] / walls[name], 2),
                "speedup_vs_direct": round(direct / walls[name], 2) if direct else None,
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs)),
                "same_bytes": digests[name] == digests[base] and len(digests[name]) == n,
            }
            for name, runs in rows.items()
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="where the copies go (default: the temp dir)")
    args = parser.parse_args()
    if not args.source.exists() and args.source == DEFAULT_SOURCE:
        sys.path.insert(0, str(Path(__file__).parent))
        from run import fixture  # benchmarks/run.py builds and caches the Keras file

        fixture("ResNet50", "weights.h5")
    jobs = tuple(int(j) for j in args.jobs.split(","))
    result = bench_batch(args.source, args.n, jobs, args.rounds, args.workdir)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
