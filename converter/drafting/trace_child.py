"""The target side of a drafted mapping in its own process (drafting.target.trace_target_side):
the parent never loads PyTorch for it, so a conversion that drafts streams its source in the
memory of one layer, and the child's peak is PyTorch's import plus the trace.

    python -m converter.drafting.trace_child REQUEST.json RESULT.json

REQUEST: ``{"to", "shapes", "dtype"}``; RESULT: ``{"graph", "manifest"}`` (JSON types only,
never a pickle) or ``{"error", "message"}`` for a ConverterError, which the parent raises again
as the same class: one line, as if drafted in its own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import errors
from ..errors import ConverterError

if TYPE_CHECKING:
    from .target import TargetSide


def traced_in_child(to: str, shapes: list[tuple[int, ...]], dtype: str) -> TargetSide:
    """:func:`converter.drafting.target.traced_here` run by a child process (this process's
    import path, so ``package.module:factory`` imports there as here). The child's stderr (the
    user's module may warn) is passed on; its failure is one line naming the target."""
    from .target import TargetSide, graph_from_json

    with tempfile.TemporaryDirectory(prefix="ckptport-trace-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"to": to, "shapes": shapes, "dtype": dtype}))
        proc = subprocess.run(
            [sys.executable, "-m", __name__, str(request), str(result)],
            capture_output=True,
            text=True,
            env=_child_env(),
        )
        data = json.loads(result.read_text()) if result.is_file() else None
    if data is None or proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
        raise ConverterError(
            f"tracing the target {to!r} in its own process failed (exit {proc.returncode}):"
            f" {last.strip()}"
        )
    sys.stderr.write(proc.stderr)
    if "error" in data:
        raise _error_class(data["error"])(data["message"])
    return TargetSide(graph_from_json(data["graph"]), data["manifest"])


def _child_env() -> dict[str, str]:
    paths = [p for p in sys.path if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _error_class(name: str) -> type[ConverterError]:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, ConverterError) else ConverterError


def main(argv: list[str]) -> None:
    """Trace, write the result, and leave without libtorch's exit-time destructors (they fault
    in ~125 MiB; see converter.cli.common.skip_native_teardown)."""
    from .target import graph_to_json, traced_here

    request = json.loads(Path(argv[0]).read_text())
    shapes = [tuple(s) for s in request["shapes"]]
    try:
        side = traced_here(request["to"], shapes, request["dtype"])
        data: dict[str, Any] = {"graph": graph_to_json(side.graph), "manifest": side.manifest}
    except ConverterError as exc:
        data = {"error": type(exc).__name__, "message": str(exc)}
    Path(argv[1]).write_text(json.dumps(data))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
