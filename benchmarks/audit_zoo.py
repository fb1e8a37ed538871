"""Run ``converter.bn.audit`` over the torchvision and timm model zoos and write docs/bn-audit-zoo.md.

Every model is built with random weights (nothing is downloaded) in eval mode, on the ``meta``
device where the builder allows it (no memory, no init compute) and on CPU otherwise. On ``meta``
the configuration rules (momentum, eps, affine, track_running_stats, train mode) are checked; the
value rules (NaN/inf, running_var <= 0, num_batches_tracked) need real tensors and are trivially
clean at init anyway. Two worker processes; about 4-5 minutes on 2 CPU cores for both zoos.

    .venv/bin/python benchmarks/audit_zoo.py                   # both zoos -> docs/bn-audit-zoo.md
    .venv/bin/python benchmarks/audit_zoo.py --limit 50        # first 50 of each zoo, quick look
    .venv/bin/python benchmarks/audit_zoo.py --json-out /tmp/zoo.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Written by hand after reading each unusual model's builder source (torchvision 0.29.1, timm 1.0.29);
# keyed by (lib, regex on the name). No model was flagged; these explain the unusual-but-deliberate
# BN configurations the tables show. A model with an unusual config and no note gets the generic
# eps note below: look at it and add one.
NOTES: list[tuple[str, str, str]] = [
    ("torchvision", r"^maxvit_t$",
     "0.01 / 1e-3 are the TF values converted right (momentum = 1 - 0.99); it shipped 0.99, the Keras value, until vision #8250."),
    ("torchvision", r"^mnasnet",
     "momentum 0.0003 = 1 - 0.9997, the paper's TF momentum converted right (comment in mnasnet.py)."),
    ("torchvision", r"^efficientnet_b[5-7]$",
     "0.01 / 1e-3 because the weights are ported from the TF release (via lukemelas/EfficientNet-PyTorch); b0-b4, ported from timm's PyTorch-trained weights, keep 0.1 / 1e-5."),
    ("torchvision", r"^efficientnet_v2",
     "eps 1e-3 from the TF reference architecture, PyTorch momentum 0.1 (weights trained by torchvision)."),
    ("torchvision", r"^(quantized_)?(googlenet|inception_v3)$",
     "eps 1e-3 in BasicConv2d: the weights are ported from the TF release; momentum stays 0.1."),
    ("torchvision", r"^(quantized_)?mobilenet_v3",
     "MobileNetV3's default norm layer is BatchNorm2d(eps=1e-3, momentum=0.01): the TF values, converted right."),
    ("torchvision", r"^(lraspp|deeplabv3)_mobilenet_v3",
     "MobileNetV3 backbone at 0.01 / 1e-3, segmentation head BNs at PyTorch defaults 0.1 / 1e-5."),
    ("torchvision", r"^fasterrcnn_mobilenet_v3",
     "built without weights the detection builder passes plain BatchNorm2d (0.1 / 1e-5), overriding MobileNetV3's "
     "0.01 / 1e-3; with weights it passes FrozenBatchNorm2d (eps 1e-5)."),
    ("torchvision", r"^ssdlite320_mobilenet_v3",
     "ssdlite.py sets BatchNorm2d(eps=1e-3, momentum=0.03) on purpose (its training recipe)."),
    ("torchvision", r"^s3d$",
     "s3d.py sets BatchNorm3d(eps=1e-3, momentum=0.001) on purpose (weights trained by torchvision with it); 0.001 is a TF-style decay of 0.999 converted right."),
    ("torchvision", r"^raft_large$",
     "BN only in the context encoder; the feature encoder uses InstanceNorm2d (no running stats, not audited)."),
    ("torchvision", r"^raft_small$",
     "no BN: InstanceNorm2d feature encoder, unnormalized context encoder."),
    ("timm", r"^fbnetc_100$",
     "watch out: eps is 1e-5 when built with pretrained=False (as here) but 1e-3 with pretrained=True, "
     "because its pretrained weights were trained with eps 1e-3; load them into a random build and set eps."),
    ("timm", r"^tf_|^efficientnet_b[1-3]_pruned$|^mobilenetv3_rw$",
     "timm's TF ports keep TF's eps 1e-3 (BN_EPS_TF_DEFAULT) and PyTorch's momentum 0.1: right for inference; "
     "to fine-tune like TF (0.99) use 0.01."),
    ("timm", r"^dpn",
     "eps 1e-3 in the DPN blocks (weights ported from the MXNet release)."),
    ("timm", r"^xception(41|65|65p|71)$",
     "BatchNorm2d(eps=1e-3, momentum=0.1): the TF DeepLab Xception eps."),
    ("timm", r"^(inception_v3|inception_v4|inception_resnet_v2|nasnetalarge|pnasnet5large)$",
     "eps 1e-3: TF-ported architecture/weights; momentum 0.1."),
    ("timm", r"^maxvit_.*_tf_",
     "eps 1e-3 for the TF-ported MaxViT weights; momentum 0.1 (not torchvision's 0.99 mistake)."),
    ("timm", r"^coatnet_bn_0_rw",
     "BN in the transformer blocks uses norm_eps 1e-6 (MBConv blocks 1e-5), a timm design choice."),
    ("timm", r"^efficientvit_l",
     "norm_eps=1e-7 for the MIT EfficientViT-L weights (stem/heads 1e-5)."),
]

MISC_NOTE_EPS = {
    1e-3: "eps 1e-3 (TF-style eps in a PyTorch model).",
    1e-6: "eps 1e-6 (unusually small).",
    1e-7: "eps 1e-7 (unusually small).",
}


def _worker_init() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import timm  # noqa: F401  torch side only; never tensorflow here
    import torchvision  # noqa: F401


def _build(lib: str, name: str) -> tuple[Any, str]:
    import torch

    from converter import bn

    spec = f"{lib}:{name}"
    try:
        with torch.device("meta"):
            return bn.resolve_model_spec(spec), "meta"
    except Exception:
        return bn.resolve_model_spec(spec), "cpu"


def audit_one(lib: str, name: str) -> dict[str, Any]:
    """Build one model and audit it; never raises (errors are recorded)."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from converter import bn

    t0 = time.perf_counter()
    row: dict[str, Any] = {"lib": lib, "name": name}
    try:
        model, where = _build(lib, name)
    except Exception as exc:
        row.update(build="failed", error=f"{type(exc).__name__}: {str(exc)[:160]}")
        return row
    bns = [m for _, m in model.named_modules() if isinstance(m, _BatchNorm)]
    other = collections.Counter(type(m).__name__ for _, m in model.named_modules()
                                if isinstance(m, torch.nn.modules.batchnorm._NormBase) and not isinstance(m, _BatchNorm))
    findings = bn.audit(model)
    row.update(
        build=where,
        module=_family(lib, name, model),
        bn=len(bns),
        bn_types=sorted({type(m).__name__ for m in bns}),
        momentum=sorted({m.momentum for m in bns}, key=lambda v: (v is None, v or 0)),
        eps=sorted({m.eps for m in bns}),
        other_norm=dict(other),
        rules=dict(collections.Counter(f.rule for f in findings)),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return row


def _family(lib: str, name: str, model: Any) -> str:
    if lib == "timm":
        import timm.models

        try:
            return timm.models._registry._model_to_module[timm.models.get_arch_name(name)]
        except Exception:
            return type(model).__module__.rsplit(".", 1)[-1]
    return type(model).__module__.replace("torchvision.models.", "")


def _pool_run(jobs: list[tuple[str, str]], workers: int) -> list[dict[str, Any]]:
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init) as ex:
        futs = [ex.submit(audit_one, lib, name) for lib, name in jobs]
        out = []
        for i, f in enumerate(futs):
            out.append(f.result())
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(jobs)}", file=sys.stderr, flush=True)
        return out


def _note(row: dict[str, Any]) -> str:
    import re

    for lib, pat, text in NOTES:
        if lib == row["lib"] and re.search(pat, row["name"]):
            return text
    if row.get("bn"):
        for e in row["eps"]:
            if e in MISC_NOTE_EPS:
                return MISC_NOTE_EPS[e]
    return ""


def _fmt_vals(vals: list[Any]) -> str:
    return ", ".join("None" if v is None else f"{v:g}" for v in vals) or "-"


def _findings(row: dict[str, Any]) -> str:
    if row.get("build") == "failed":
        return "build failed"
    if not row["rules"]:
        return "clean" if row["bn"] else "clean (no BN)"
    return ", ".join(f"{r} ×{n}" for r, n in sorted(row["rules"].items()))


def render(rows: list[dict[str, Any]], seconds: float, argv: list[str]) -> str:
    import timm
    import torch
    import torchvision

    tv = [r for r in rows if r["lib"] == "torchvision"]
    tm = [r for r in rows if r["lib"] == "timm"]
    flagged = [r for r in rows if r.get("rules")]
    failed = [r for r in rows if r.get("build") == "failed"]
    rule_totals: collections.Counter[str] = collections.Counter()
    for r in rows:
        for k in r.get("rules", {}):
            rule_totals[k] += 1
    lines = [
        "# BatchNorm audit of the torchvision and timm zoos",
        "",
        "Generated by `benchmarks/audit_zoo.py` (do not edit the tables by hand; notes live in the script's",
        "`NOTES`). Every model is built with random weights in eval mode and checked with",
        "`converter.bn.audit` (the rules `ckptport audit` applies; see `docs/batchnorm.md`).",
        "",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPU cores; sweep took {seconds:.0f} s "
        f"(`{' '.join(['benchmarks/audit_zoo.py', *argv])}`).",
        f"- Models: {len(tv)} torchvision, {len(tm)} timm; {sum(1 for r in rows if r.get('bn'))} have BatchNorm; "
        f"{len(flagged)} flagged; {len(failed)} failed to build.",
        "- Built on the `meta` device where possible (config rules only: momentum, eps, affine,",
        "  track_running_stats, train mode); the rest on CPU (all rules). The value rules (NaN/inf,",
        "  running_var <= 0, num_batches_tracked) cannot fire on freshly initialized stats, so random-weight",
        "  zoo models are audited for *configuration* mistakes; `ckptport audit file.safetensors` checks values.",
        "- Without a source checkpoint there is no recorded source eps, so `eps-mismatch` cannot fire here;",
        "  an eps other than 1e-5 is listed in the eps column and explained in the notes.",
        "",
        "## Summary",
        "",
    ]
    if rule_totals:
        lines += ["| rule | models |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in sorted(rule_totals.items())]
    else:
        lines += ["No rule fired on any model: every BatchNorm in both zoos has a PyTorch-convention momentum",
                  "(<= 0.5, none None), tracks running stats and is affine."]
    lines += [""]
    mom = collections.Counter(m for r in rows for m in r.get("momentum", []))
    eps = collections.Counter(e for r in rows for e in r.get("eps", []))
    lines += [
        "BN momentum values seen (models using each): "
        + ", ".join(f"{'None' if k is None else f'{k:g}'} ({v})" for k, v in sorted(mom.items(), key=lambda kv: -kv[1])) + ".",
        "",
        "BN eps values seen (models using each): "
        + ", ".join(f"{k:g} ({v})" for k, v in sorted(eps.items(), key=lambda kv: -kv[1])) + ".",
        "",
    ]
    if flagged:
        lines += ["## Flagged models", "", "| model | findings | why (checked by hand) |", "|---|---|---|"]
        lines += [f"| {r['lib']}:{r['name']} | {_findings(r)} | {_note(r)} |" for r in flagged]
        lines += [""]
    if failed:
        lines += ["## Failed to build", "", "| model | error |", "|---|---|"]
        lines += [f"| {r['lib']}:{r['name']} | {r['error'].replace('|', '/')} |" for r in failed]
        lines += [""]
    lines += ["## torchvision (every model)", "",
              "| model | family | BN | momentum | eps | other norms | findings | built | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(tv, key=lambda r: r["name"]):
        if r.get("build") == "failed":
            lines.append(f"| {r['name']} | | | | | | build failed | | {r['error'].replace('|', '/')} |")
            continue
        other = ", ".join(f"{k} ×{v}" for k, v in sorted(r["other_norm"].items())) or "-"
        lines.append(
            f"| {r['name']} | {r['module']} | {r['bn']} | {_fmt_vals(r['momentum'])} | {_fmt_vals(r['eps'])} | "
            f"{other} | {_findings(r)} | {r['build']} | {_note(r)} |"
        )
    lines += ["", "## timm (every model, grouped by model file and BN config)", "",
              "Models of one timm model file with the same BN configuration and findings share a row.", "",
              "| file | models | BN per model | momentum | eps | findings | note |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in tm:
        if r.get("build") == "failed":
            key = (r.get("module", "?"), "failed", (), (), "build failed", "")
        else:
            key = (r["module"], "ok", tuple(r["momentum"]), tuple(r["eps"]), _findings(r), _note(r))
        groups[key].append(r)
    for key in sorted(groups, key=lambda k: (k[0], k[4], str(k[2]), str(k[3]))):
        module, _, mom_k, eps_k, fnd, note = key
        rs = groups[key]
        names = ", ".join(r["name"] for r in sorted(rs, key=lambda r: r["name"]))
        nbn = sorted({r.get("bn", 0) for r in rs})
        nbn_s = f"{nbn[0]}" if len(nbn) == 1 else f"{nbn[0]}-{nbn[-1]}"
        if fnd.startswith("clean") and all(not r.get("bn") for r in rs):
            fnd = "clean (no BN)"
        lines.append(f"| {module} | {names} | {nbn_s} | {_fmt_vals(list(mom_k))} | {_fmt_vals(list(eps_k))} | {fnd} | {note} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="first N models of each zoo (default: all)")
    ap.add_argument("--zoo", choices=["both", "torchvision", "timm"], default="both")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bn-audit-zoo.md")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the raw rows as JSON")
    args = ap.parse_args(argv)
    _worker_init()
    import timm
    import torchvision

    jobs: list[tuple[str, str]] = []
    if args.zoo in ("both", "torchvision"):
        jobs += [("torchvision", n) for n in sorted(torchvision.models.list_models())[: args.limit]]
    if args.zoo in ("both", "timm"):
        jobs += [("timm", n) for n in sorted(timm.list_models())[: args.limit]]
    print(f"auditing {len(jobs)} models with {args.workers} workers", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rows = _pool_run(jobs, args.workers)
    seconds = time.perf_counter() - t0
    shown_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    args.out.write_text(render(rows, seconds, shown_argv))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1, default=str))
    print(f"wrote {args.out} ({len(rows)} models, {seconds:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
