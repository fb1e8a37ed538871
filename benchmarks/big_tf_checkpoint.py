"""A sharded TF checkpoint larger than memory-friendly sizes converts with bounded memory (issue 12,
part 4; a benchmark, not a test). Writes a TF1 name-based checkpoint of Dense layers (ReLU) with a
BatchNorm after every few, random seeded weights, over several shards in pure Python
(fixtures/tf_bundle_writer.py, one tensor in memory at a time), then converts it as a user would,
onto the PyTorch twin defined here (its layers drafted from the variable names, as a chain), as a
whole process under ``/usr/bin/time -v``, then again with the table that run drafted
(``--mapping``: no PyTorch import), and prints the wall time and peak RSS of both:

    python benchmarks/big_tf_checkpoint.py --out /work/bench-fixtures/tfbig        # 3 GiB, 8 shards
    python benchmarks/big_tf_checkpoint.py --out DIR --width 64 --depth 6 --keep  # seconds

The twin: ``ckptport convert DIR/ckpt --to benchmarks/big_tf_checkpoint.py:twin`` reads the
layout from ``DIR/layout.json``. The checkpoint and output are deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BN_EVERY = 4
LAYOUT_ENV = "BIG_TF_LAYOUT"  # layout.json of the checkpoint the twin is built for


def layer_names(depth: int, bn_every: int = BN_EVERY) -> list[tuple[str, str]]:
    """(scope, kind) in creation order; zero-padded so that the names sort in that order (a TF1
    checkpoint without a .meta graph is read in name order)."""
    out, n = [], 0
    for i in range(depth):
        out.append((f"layer_{n:03d}", "dense"))
        n += 1
        if (i + 1) % bn_every == 0:
            out.append((f"layer_{n:03d}", "bn"))
            n += 1
    return out


def tensors(width: int, depth: int, seed: int = 0):
    """(name, array) one at a time: Dense kernels (in, out) and biases, BN gamma, beta and
    moving statistics, all randomized."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for scope, kind in layer_names(depth):
        if kind == "dense":
            kernel = rng.standard_normal((width, width), dtype=np.float32)
            kernel *= np.float32(1 / np.sqrt(width))
            yield f"{scope}/kernel", kernel
            yield f"{scope}/bias", rng.normal(0, 0.1, width).astype(np.float32)
        else:
            yield f"{scope}/gamma", rng.uniform(0.5, 1.5, width).astype(np.float32)
            yield f"{scope}/beta", rng.normal(0, 0.2, width).astype(np.float32)
            yield f"{scope}/moving_mean", rng.normal(0, 0.2, width).astype(np.float32)
            yield f"{scope}/moving_variance", rng.uniform(0.5, 1.5, width).astype(np.float32)


def twin():
    """The PyTorch module of the checkpoint named by $BIG_TF_LAYOUT (the user's own module)."""
    from torch import nn

    layout = json.loads(Path(os.environ[LAYOUT_ENV]).read_text())
    width, blocks = layout["width"], []
    for _, kind in layer_names(layout["depth"]):
        blocks += [nn.Linear(width, width), nn.ReLU()] if kind == "dense" else []
        blocks += [nn.BatchNorm1d(width, eps=1e-3)] if kind == "bn" else []
    return nn.Sequential(*blocks)


def write(out: Path, width: int, depth: int, shards: int) -> Path:
    sys.path.insert(0, str(ROOT / "fixtures"))
    from tf_bundle_writer import write_bundle

    out.mkdir(parents=True, exist_ok=True)
    (out / "layout.json").write_text(json.dumps({"width": width, "depth": depth}))
    return write_bundle(out / "ckpt", tensors(width, depth), shards)


def convert(prefix: Path, out: Path, mapping: Path | None = None) -> dict[str, float]:
    """``ckptport convert`` as a whole process under /usr/bin/time -v: wall s, peak RSS MiB. With
    ``mapping`` (the table the first run drafted beside its output) instead of ``--to``."""
    how = ["--mapping", str(mapping)] if mapping else ["--to", f"{Path(__file__).resolve()}:twin"]
    cmd = [sys.executable, "-m", "converter", "convert", str(prefix), *how, "-o", str(out),
           "--no-verify", "--source-bn-momentum", "0.99"]  # fmt: skip
    env = {**os.environ, LAYOUT_ENV: str(prefix.parent / "layout.json")}
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"convert failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    parts = [float(p) for p in wall.group(1).split(":")]
    return {"wall_s": sum(p * 60**i for i, p in enumerate(reversed(parts))), "rss_mib": rss / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the checkpoint (created)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--depth", type=int, default=48, help="Dense layers (48 at 4096: 3 GiB)")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    args = ap.parse_args(argv)
    prefix = write(args.out, args.width, args.depth, args.shards)
    size = sum(p.stat().st_size for p in args.out.glob("ckpt.data-*"))
    try:
        drafted = convert(prefix, args.out / "out.safetensors")
        mapped = convert(prefix, args.out / "again.safetensors", args.out / "out.mapping.toml")
    finally:
        if not args.keep:
            shutil.rmtree(args.out)
    size_gib = round(size / 2**30, 2)
    for how, row in (("--to (drafts)", drafted), ("--mapping (drafted table)", mapped)):
        print(json.dumps({"checkpoint_gib": size_gib, "shards": args.shards, "how": how, **row}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
