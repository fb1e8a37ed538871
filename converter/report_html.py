"""Self-contained HTML verification report: a per-layer error plot (inline SVG, log scale, the
tolerance as a line, failures in red, the first divergence marked) and the layer table."""

from __future__ import annotations

import html
import math
import string
from typing import Any

W, H, ML, MR, MT, MB = 960, 360, 70, 20, 30, 60


def _y(v: float, lo: float, hi: float) -> float:
    v = min(max(v, 10**lo), 10**hi)
    return MT + (hi - math.log10(v)) / (hi - lo) * (H - MT - MB)


PAGE = string.Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ckptport verification: $title</title>
<style>body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}tr.bad td{background:#fde2e2}
.verdict{font-size:22px;font-weight:bold;color:$color}</style></head><body>
<h1>ckptport verification</h1><p>$title</p>
<p class="verdict">$verdict</p>
<p>$summary</p>
$first
$plot
<ul>$notes</ul>
<h2>Layers</h2><table><tr><th>#</th><th>Keras layer</th><th>PyTorch module</th><th>shape</th>
<th>max abs</th><th>rel (RMS)</th><th>cosine</th><th>verdict</th></tr>$table</table>$bn
</body></html>
""")


def render(report: Any, title: str) -> str:
    """The self-contained HTML page: verdict, per-layer error plot, notes, tables."""
    color = "#2ca02c" if report.passed else "#d62728"
    summary = (
        f"{len(report.layers)} layer pairs, batch input {'x'.join(map(str, report.input_shape))},"
        f" tolerance rtol {report.rtol:g}\natol {report.atol:g}, device"
        f" {html.escape(report.device)}. {_output_sentence(report)}"
    )
    return PAGE.substitute(
        title=html.escape(title),
        color=color,
        verdict="PASS" if report.passed else "MISMATCH",
        summary=summary,
        first=_first_divergent(report),
        plot=_plot(report),
        notes=_notes(report),
        table="".join(_layer_row(r) for r in report.layers),
        bn=_bn_section(report),
    )


def _first_divergent(report: Any) -> str:
    f = report.first_divergent
    if not f:
        return ""
    return (
        f"<p><b>First divergent layer:</b> {html.escape(str(f.get('source_layer')))} &rarr; "
        f"{html.escape(str(f.get('target_module')))}</p>"
    )


def _plot(report: Any) -> str:
    """Per-layer relative RMS error on a log scale, the tolerance as a red dashed line."""
    rows = report.layers
    rels = [r.rel for r in rows if math.isfinite(r.rel) and r.rel > 0] + [report.rtol]
    lo = math.floor(math.log10(max(min(rels), 1e-12))) - 1
    hi = math.ceil(math.log10(max(rels))) + 1
    n = max(len(rows), 1)
    xs = [ML + (i + 0.5) / n * (W - ML - MR) for i in range(len(rows))]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
        'aria-label="per-layer relative RMS error, log scale">',
        f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="#fafafa"'
        ' stroke="#999"/>',
        *_grid(lo, hi, report.rtol),
    ]
    ys = [_y(r.rel if math.isfinite(r.rel) else 10**hi, lo, hi) for r in rows]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
    first = (report.first_divergent or {}).get("index")
    for x, y, r in zip(xs, ys, rows):
        parts += _point(x, y, r, r.index == first)
    parts += _axis_labels()
    parts.append("</svg>")
    return "".join(parts)


def _grid(lo: int, hi: int, rtol: float) -> list[str]:
    parts = []
    for e in range(lo, hi + 1):
        y = _y(10**e, lo, hi)
        parts.append(f'<line x1="{ML}" x2="{W - MR}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        parts.append(
            f'<text x="{ML - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end">1e{e}</text>'
        )
    ty = _y(rtol, lo, hi)
    parts.append(
        f'<line x1="{ML}" x2="{W - MR}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#d62728"'
        ' stroke-dasharray="6,4" stroke-width="2"/>'
    )
    parts.append(
        f'<text x="{W - MR - 4}" y="{ty - 6:.1f}" font-size="12" text-anchor="end"'
        f' fill="#d62728">tolerance {rtol:g}</text>'
    )
    return parts


def _point(x: float, y: float, r: Any, is_first: bool) -> list[str]:
    color = "#2ca02c" if r.passed else "#d62728"
    parts = [
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5"'
        f' fill="{color}"><title>{html.escape(r.source_layer)} ->'
        f" {html.escape(r.target_module)}: {r.rel:.3g}</title></circle>"
    ]
    if is_first:
        parts.append(
            f'<text x="{x:.1f}" y="{y - 10:.1f}" font-size="12" text-anchor="middle"'
            f' fill="#d62728">first divergence: {html.escape(r.source_layer)}</text>'
        )
    return parts


def _axis_labels() -> list[str]:
    return [
        f'<text x="{(W + ML) / 2:.0f}" y="{H - 20}" font-size="13" text-anchor="middle">layer'
        " (model order)</text>",
        f'<text x="16" y="{(H - MB + MT) / 2:.0f}" font-size="13" text-anchor="middle" '
        f'transform="rotate(-90 16 {(H - MB + MT) / 2:.0f})">RMS(error) / RMS(reference)</text>',
    ]


def _layer_row(r: Any) -> str:
    return (
        f"<tr class='{'ok' if r.passed else 'bad'}'><td>{r.index}</td>"
        f"<td>{html.escape(r.source_layer)}</td><td>{html.escape(r.target_module)}</td>"
        f"<td>{'x'.join(map(str, r.shape))}</td><td>{r.max_abs:.3g}</td><td>{r.rel:.3g}</td>"
        f"<td>{r.cosine:.8f}</td><td>{'pass' if r.passed else 'FAIL'}</td></tr>"
    )


def _bn_section(report: Any) -> str:
    if not report.train_step:
        return ""
    rows = "".join(
        f"<tr class='{'ok' if b.passed else 'bad'}'><td>{html.escape(b.source_layer)}</td>"
        f"<td>{html.escape(b.target_module)}</td><td>{b.keras_momentum:g}</td>"
        f"<td>{b.torch_momentum:g}</td><td>{b.mean_rel:.3g}</td><td>{b.var_rel:.3g}</td>"
        f"<td>{b.var_rel_uncorrected:.3g}</td></tr>"
        for b in report.train_step
    )
    return (
        "<h2>Training-mode step: BatchNorm statistics</h2><p>Errors relative to the size of"
        " the update. PyTorch updates running_var with the unbiased batch variance, Keras with"
        " the biased one; the corrected column accounts for it"
        " exactly.</p><table><tr><th>Keras layer</th><th>module</th><th>Keras"
        " momentum</th><th>torch momentum</th><th>mean err</th><th>var err"
        f" (corrected)</th><th>var err (naive)</th></tr>{rows}</table>"
    )


def _notes(report: Any) -> str:
    excluded = [
        f"excluded: {e['module']} (Keras {', '.join(e['source_layers'])}): {e['reason']}"
        for e in report.excluded
    ]
    return "".join(f"<li>{html.escape(n)}</li>" for n in [*report.notes, *excluded])


def _output_sentence(report: Any) -> str:
    out = report.output
    if out.get("comparable", True):
        return (
            f"Output ({report.compared}): max abs {out['max_abs']:.3g}, rel {out['rel']:.3g}, "
            f"cosine {out['cosine']:.8f}."
        )
    return f"Output not comparable: {html.escape(out.get('reason', ''))}."
