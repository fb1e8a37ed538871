"""The HTML verification report: self-contained, with a readable per-layer error plot, rendered in
headless Chromium. `make test` installs Debian's chromium when it runs as root; under CI=true a
missing browser fails the test instead of skipping it; CKPTPORT_CHROMIUM names another browser
binary. CKPTPORT_SCREENSHOT=path keeps the screenshot (docs/report-screenshot.png is one)."""

from __future__ import annotations

import os
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


CHROMIUM = "/usr/bin/chromium"
# Root needs --no-sandbox; the rest keeps a headless run from reaching the network or a GPU.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    """The browser: $CKPTPORT_CHROMIUM if set, else Debian's /usr/bin/chromium or one on PATH."""
    wanted = os.environ.get("CKPTPORT_CHROMIUM") or CHROMIUM
    exe: str | None = wanted
    if not os.access(wanted, os.X_OK):
        exe = None if "CKPTPORT_CHROMIUM" in os.environ else shutil.which("chromium")
    if exe is None:
        msg = f"{wanted} missing: `make test` installs it as root (apt-get install -y chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must render the HTML report")
        pytest.skip(msg)
    return exe


def run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_report_dom_in_headless_chromium(tmp_path, chromium):
    """What the browser parsed (not our string): the layer table and plot are in the DOM."""
    page = tmp_path / "report.html"
    page.write_text(render(synthetic_report(), "a.keras vs a.safetensors"))
    dom = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=2000", "--dump-dom",
                       page.as_uri()).stdout
    assert "<tbody>" in dom, "not a browser-serialized DOM"  # the parser inserts tbody
    layers = dom[dom.index("<h2>Layers</h2>"):]
    assert layers.count('<tr class="bad">') == 15 and layers.count('<tr class="ok">') == 25
    assert "<td>block25_bn</td><td>blocks.25.bn1</td>" in layers
    assert dom.count("<circle") == 40 and "MISMATCH" in dom


def test_report_renders_in_headless_chromium(tmp_path, chromium):
    page = tmp_path / "report.html"
    page.write_text(render(synthetic_report(), "a.keras vs a.safetensors"))
    shot = tmp_path / "shot.png"
    run_chromium(chromium, tmp_path / "profile", "--window-size=1100,2200", f"--screenshot={shot}",
                 page.as_uri())
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1100, 2200)
    colors = img.getcolors(maxcolors=1 << 22)
    counts = {c: n for n, c in colors}

    def near(rgb, tol=30):
        return sum(n for c, n in counts.items() if all(abs(a - b) <= tol for a, b in zip(c, rgb)))

    assert len(counts) > 50, "blank screenshot"
    assert near((214, 39, 40)) > 200, "red (tolerance line, failing points) not drawn"
    assert near((31, 119, 180)) > 200, "blue error polyline not drawn"
    assert near((44, 160, 44)) > 100, "green passing points not drawn"
    assert near((253, 226, 226), tol=4) > 100_000, "the 15 failing table rows are not shaded"
    if os.environ.get("CKPTPORT_SCREENSHOT"):
        shutil.copy(shot, os.environ["CKPTPORT_SCREENSHOT"])


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
