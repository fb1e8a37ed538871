"""``ckptport audit TARGET``: check a model spec or one of our checkpoints for BatchNorm mistakes.

Exit codes (for CI gating): 0 clean (or only findings below ``--fail-on``), 1 findings at or above
``--fail-on``, 2 the audit could not run.
"""

from __future__ import annotations

from typing import Any

import click

from .common import EXIT_FINDINGS, EXIT_OK, emit_json, json_option, stderr_console

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SHOW_MODULES = 4


@click.command("audit")
@click.argument("target")
@click.option(
    "--fail-on",
    type=click.Choice(["info", "warning", "error"]),
    default="warning",
    show_default=True,
    help="Exit 1 when a finding is at or above this severity.",
)
@json_option
def command(target: str, fail_on: str, as_json: bool) -> int:
    """Check TARGET for BatchNorm mistakes.

    TARGET is a model spec (torchvision:NAME, timm:NAME, path/to/file.py:factory; built with
    random weights, in eval mode) or a .safetensors/.pt checkpoint ckptport wrote (its recorded
    source eps/scale/center are checked too).
    """
    from .. import bn

    report = bn.audit_target(target)
    failed = report.fails(fail_on)
    if as_json:
        emit_json(report.to_dict())
    else:
        _print_table(report)
        click.echo(_summary(report, fail_on, failed))
    return EXIT_FINDINGS if failed else EXIT_OK


def _summary(report: Any, fail_on: str, failed: bool) -> str:
    counts = {
        s: sum(f.severity == s for f in report.findings) for s in ("error", "warning", "info")
    }
    found = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n) or "clean"
    verdict = f"FAIL (--fail-on {fail_on})" if failed else "ok"
    return f"audit {report.target}: {report.modules_checked} BN modules checked, {found}: {verdict}"


def _grouped(findings: list[Any]) -> list[tuple[Any, list[str]]]:
    """One row per (rule, message, fix): the same mistake in 30 modules reads as one line."""
    groups: dict[tuple[str, str, str, str], list[str]] = {}
    first: dict[tuple[str, str, str, str], Any] = {}
    for f in findings:
        key = (f.rule, f.severity, f.message, f.fix)
        groups.setdefault(key, []).append(f.module or "(root)")
        first.setdefault(key, f)
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(
        ((first[k], mods) for k, mods in groups.items()), key=lambda r: order[r[0].severity]
    )


def _print_table(report: Any) -> None:
    if not report.findings:
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"BatchNorm audit: {report.target}", show_lines=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("rule / modules", max_width=34)
    table.add_column("why it matters / fix", ratio=1, overflow="fold")
    for f, mods in _grouped(report.findings):
        shown = ", ".join(mods[:_SHOW_MODULES]) + (
            f", … ({len(mods)} in all)" if len(mods) > _SHOW_MODULES else ""
        )
        table.add_row(
            f"[{_STYLE[f.severity]}]{f.severity}[/]",
            f"{f.rule}\n[dim]{escape(shown)}[/]",
            f"{escape(f.message)}\n[green]fix:[/] {escape(f.fix)}",
        )
    stderr_console().print(table)
