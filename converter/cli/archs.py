"""ckptport archs"""

from __future__ import annotations

import click

from .common import emit_json, json_option, stderr_console


@click.command("archs")
@json_option
def command(as_json) -> int:
    """List mapping tables: source architecture, target, surgeries (first target = default); then
    the recognised architectures convert refuses (no exact PyTorch twin) and why."""
    from ..refusals import unique_refusals
    from ..tables import builtin_tables

    rows = []
    seen = set()  # across tables: convert's default is the first variant for a source in any table
    for table in builtin_tables():
        for v in table.variants:
            rows.append(
                {
                    "table": table.id,
                    "version": table.version,
                    "family": table.family,
                    "source": v.source or "(any covered)",
                    "target": v.target,
                    "default": v.source not in seen,
                    "surgeries": [s["name"] for s in v.surgeries],
                    "head": table.head.get("module"),
                }
            )
            seen.add(v.source)
    refusals = [
        {
            "sources": list(r.sources),
            "reason": r.reason,
            "closest": r.closest,
            "differs": r.differs,
            "remedy": r.remedy,
        }
        for r in unique_refusals()
    ]
    if as_json:
        emit_json({"tables": rows, "refusals": refusals})
        return 0
    from rich.table import Table

    t = Table("table", "source", "target", "surgeries")
    for r in rows:
        t.add_row(
            r["table"],
            r["source"],
            r["target"] + (" (default)" if r["default"] else ""),
            ", ".join(r["surgeries"]) or "-",
        )
    refused = Table("recognised source", "refused: no exact PyTorch twin", "closest")
    for r in refusals:
        refused.add_row(", ".join(r["sources"]), r["reason"], r["closest"])
    stderr_console().print(t)
    stderr_console().print(refused)
    return 0
