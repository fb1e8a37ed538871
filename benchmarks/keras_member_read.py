"""Reading a .keras archive's model.weights.h5: in place (what ckptport does: h5py on a window onto
the stored member, its zip CRC checked first) vs the member read whole into memory (ckptport up to
2026-11-23), every tensor loaded. Whole processes, alternated, medians (a benchmark, not a test):

    python benchmarks/keras_member_read.py path/to/model.keras [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_READ = """
import io, json, resource, sys, time, zipfile
from pathlib import Path
import h5py
from converter.formats.keras_h5 import member_file
path, mode = Path(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
with zipfile.ZipFile(path) as zf:
    if mode == "whole":
        fileobj = io.BytesIO(zf.read("model.weights.h5"))
    else:
        fileobj = member_file(zf, path, "model.weights.h5")
nbytes = []
with h5py.File(fileobj, "r") as f:
    f.visititems(lambda name, obj: nbytes.append(obj[()].nbytes) if isinstance(obj, h5py.Dataset) else None)
print(json.dumps({"wall_s": time.perf_counter() - t, "nbytes": sum(nbytes),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("keras", help="a .keras file")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    rows: dict[str, list[dict]] = {"in place": [], "whole": []}
    for _ in range(args.runs + 1):  # the first round warms the page cache
        for mode in rows:
            out = subprocess.run(
                [sys.executable, "-c", _READ, args.keras, mode], capture_output=True, text=True
            )
            rows[mode].append(json.loads(out.stdout))
    for mode, runs in rows.items():
        runs = runs[1:]
        walls = [r["wall_s"] for r in runs]
        print(
            f"{mode:8s}: read {runs[0]['nbytes'] / 2**20:.0f} MiB in {statistics.median(walls):.2f} s"
            f" ({min(walls):.2f}-{max(walls):.2f}), peak RSS"
            f" {statistics.median(r['peak_rss_mib'] for r in runs):.0f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
