"""``ckptport convert A B C -o DIR`` (or a directory of checkpoints): the batch side of ``convert``,
its checks, progress bar, per-file lines and JSON list (converter.batch does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConverterError

# flags that act on one conversion: refused with several sources (flag -> what to do instead)
ONE_SOURCE_ONLY = {
    "--verify": "verify each output with `ckptport verify SRC OUT`",
    "--inputs": "verify each output with `ckptport verify SRC OUT --inputs ...`",
    "--no-verify": "it only follows a drafted mapping, which batch conversion does not draft",
}


def check_batch_flags(given: dict[str, bool], to: str | None, mapping: Any, n: int) -> None:
    """Refuse, in one line, the flags that act on one conversion and drafting a mapping (each
    file would draft and verify its own): what to do instead."""
    from .convert import may_draft

    for flag, on in given.items():
        if on:
            raise ConverterError(
                f"{flag} works on one source and {n} are given: convert them, then"
                f" {ONE_SOURCE_ONLY[flag]}"
            )
    if mapping is None and may_draft(to):
        raise ConverterError(
            f"--to {to} drafts a mapping, which batch conversion ({n} sources) does not do: draft"
            f" it once (`ckptport draft SRC --to {to} -o table.toml`, review it), then convert"
            " them all with --mapping table.toml"
        )


def run_batch(sources: list[Path], skipped: list[Path], jobs: int, **params: Any) -> int:
    """Convert every source into the directory ``-o`` (``params``: the command's options), in
    ``jobs`` workers: the checks first, then one line per file, a summary line or the JSON list;
    the exit code (2 when any failed)."""
    from ..model import check_spec
    from .common import stderr_console

    given = {"--verify": params["do_verify"], "--inputs": bool(params["verify_inputs"])}
    given["--no-verify"] = params["no_verify"]
    check_batch_flags(given, params["to"], params["mapping"], len(sources))
    if params["to"] is not None:
        check_spec(params["to"])  # a bad --to names itself before any file is read
    names = ("to", "force", "mapping", "source_model", "num_classes", "pooling", "use_ema")
    more = ("source_bn_momentum", "accept_folded_bn", "output_io", "skip_existing")
    options = {name: params[name] for name in names + more}
    options["format"] = params["src_format"]
    outdir = params["output"] or Path.cwd()
    return _convert_all(
        stderr_console(), sources, skipped, outdir, jobs, params["as_json"], options
    )


def _convert_all(
    console, sources: list[Path], skipped: list[Path], outdir: Path, jobs: int, as_json: bool,
    options: dict[str, Any],
) -> int:  # fmt: skip
    """Convert every source into ``outdir`` with ``options`` (convert_file's), ``jobs`` workers;
    one line per file, a summary line, the JSON list; the exit code (2 when any failed)."""
    import time

    from rich.markup import escape

    from ..batch import convert_many, default_jobs, exit_code, plan_outputs
    from .common import emit_json
    from .convert import summary

    pairs = plan_outputs(sources, outdir)
    if skipped and not as_json:
        names = ", ".join(p.name for p in skipped)
        what = "entry that is" if len(skipped) == 1 else "entries that are"
        console.print(f"skipped {len(skipped)} {what} no checkpoint: {escape(names)}")
    start, workers = time.perf_counter(), default_jobs(jobs)
    with _file_bar(console, len(pairs), as_json) as advance:

        def on_done(outcome) -> None:
            advance()
            if not as_json:
                console.print(escape(file_line(outcome)))

        outcomes = convert_many(pairs, options, workers, on_done, summarize=summary)
    if as_json:
        emit_json([o.to_dict() for o in outcomes])
    else:
        console.print(escape(total_line(outcomes, time.perf_counter() - start, workers)))
    return exit_code(outcomes)


def _file_bar(console, total: int, quiet: bool):
    """A progress bar over files on stderr (a terminal only); yields the function that advances
    it."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.progress import TimeElapsedColumn

    @contextmanager
    def bar():
        with Progress(
            TextColumn("converting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet or not console.is_terminal,
        ) as progress:
            task = progress.add_task("", total=total)
            yield lambda: progress.advance(task)

    return bar()


def file_line(outcome) -> str:
    """One line per file: where it went, the target, tensors and time; that its output exists
    (--skip-existing); or why it failed."""
    if outcome.skipped:
        return f"skipped   {outcome.source}: {outcome.output} exists (--skip-existing)"
    if not outcome.ok:  # most errors name the file first
        named = outcome.error.startswith(str(outcome.source))
        return f"failed    {'' if named else f'{outcome.source}: '}{outcome.error}"
    info = outcome.info
    return (
        f"converted {outcome.source} -> {outcome.output}: {info['target']}, {info['tensors']}"
        f" tensors, {outcome.seconds:.2f} s"
    )


def total_line(outcomes: list, seconds: float, workers: int) -> str:
    """The last line: how many converted (and skipped), in how long, and which failed."""
    failed = [str(o.source) for o in outcomes if not o.ok]
    skipped = sum(o.skipped for o in outcomes)
    done = len(outcomes) - len(failed) - skipped
    jobs = f", {workers} workers" if workers > 1 and len(outcomes) > 1 else ""
    kept = f", {skipped} skipped (their outputs exist)" if skipped else ""
    line = f"{done} of {len(outcomes)} converted{kept} in {seconds:.1f} s{jobs}"
    return line + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")
