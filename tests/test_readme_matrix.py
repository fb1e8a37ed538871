"""The README's support matrix is generated from the table registry: a new or changed table without
`make readme` fails here."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import gen_support_matrix  # noqa: E402


def test_readme_matrix_is_rendered_from_the_registry():
    assert gen_support_matrix.main(["--check"]) == 0, "run `make readme`"


def test_every_table_has_a_row():
    from converter.tables import builtin_tables

    section = gen_support_matrix.render()
    for table in builtin_tables():
        assert f"(`{table.id}`)" in section
