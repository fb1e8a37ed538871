"""House style, enforced: black at 100 columns over the package, no line over 100, no function over
60 lines without a reason in its docstring."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "converter"


def test_black_formats_the_package():
    proc = subprocess.run(
        [sys.executable, "-m", "black", "--check", "-q", str(PACKAGE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"run `black converter`:\n{proc.stderr}"


def test_no_line_over_100_columns():
    long = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if len(line) > 100
    ]
    assert not long, long


def test_no_long_function_without_a_reason():
    """Functions read as named steps: over 60 lines needs 'long because' in the docstring."""
    long = []
    for p in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 60 and "long because" not in (ast.get_docstring(node) or ""):
                    long.append(f"{p.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert not long, long


def test_every_package_is_installed():
    """pyproject lists packages explicitly: a subpackage left out works in the editable install
    and is missing from a wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "converter").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
