"""The HTML verification report: self-contained, with a readable per-layer error plot. When Chromium
is installed the page is rendered headless and the screenshot checked (docs/report-screenshot.png
is one such screenshot)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from converter.report_html import render
from converter.verification import LayerResult, VerificationReport


def synthetic_report() -> VerificationReport:
    layers = []
    for i in range(40):
        rel = 3e-7 * (1.2**i) if i < 25 else 5e-2 * (1 + i / 10)  # diverges at layer 25
        layers.append(LayerResult(i, f"block{i}_bn", f"blocks.{i}.bn1", [4, 16, 8, 8], rel * 3, rel, 1 - rel,
                                  rel <= 1e-4, rel * 4))
    output = {"comparable": True, "max_abs": 0.3, "rel": 0.05, "max_rel": 0.2, "cosine": 0.99, "passed": False}
    report = VerificationReport(layers, output, 1e-4, 0.0, 4, [4, 64, 64, 3], "logits", notes=["synthetic"])
    assert not report.passed and report.first_divergent["index"] == 25  # derived from the layers
    return report


def test_report_is_self_contained_and_marks_everything(tmp_path):
    html = render(synthetic_report(), "a.keras vs a.safetensors")
    assert "MISMATCH" in html and "first divergence: block25_bn" in html
    assert html.count("<circle") == 40 and "<polyline" in html
    assert "tolerance 0.0001" in html and 'stroke-dasharray="6,4"' in html
    assert not re.search(r"<script|<link|src=|url\(", html), "the page must not load anything"
    assert "1e-7" in html or "1e-8" in html  # log-scale axis labels
    # every failing layer is red, every passing one green
    assert html.count('fill="#d62728"><title>') == 15 and html.count('fill="#2ca02c"><title>') == 25


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(render(synthetic_report(), "a.keras vs a.safetensors"))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    "--hide-scrollbars", "--window-size=1100,700", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    counts = {c: n for n, c in colors}

    def near(rgb, tol=30):
        return sum(n for c, n in counts.items() if all(abs(a - b) <= tol for a, b in zip(c, rgb)))

    assert near((214, 39, 40)) > 200, "red (tolerance line, failing points) not drawn"
    assert near((31, 119, 180)) > 200, "blue error polyline not drawn"
    assert near((44, 160, 44)) > 100, "green passing points not drawn"
    Path(__file__).resolve().parents[1].joinpath("out").mkdir(exist_ok=True)
    shutil.copy(shot, Path(__file__).resolve().parents[1] / "out" / "report-screenshot.png")


def test_report_of_a_head_reset_says_what_was_not_compared():
    report = synthetic_report()
    report.layers = report.layers[:25]  # all passing
    report.output = {"comparable": False, "reason": "head reset to 7 classes", "excluded_module": "fc",
                     **dict.fromkeys(("max_abs", "rel", "max_rel", "cosine", "passed"))}
    report.excluded = [{"module": "fc", "source_layers": ["predictions"], "reason": "head reset to 7 classes"}]
    assert report.passed and report.first_divergent is None
    html = render(report, "a.keras vs a.safetensors")
    assert "PASS" in html and "Output not comparable: head reset to 7 classes" in html
    assert "excluded: fc (Keras predictions): head reset to 7 classes" in html
