"""The port's mapping table: one rule per weighted Keras layer, to the module attribute the
generated file gives it. Written as an ordinary table file, so the ordinary conversion path and
the layer-by-layer verification read it like any other."""

from __future__ import annotations

import json
import re
from typing import Any

from .codegen import RuleSpec, Stub


def _value(v: Any) -> str:
    """A TOML value (JSON's strings, numbers and booleans are TOML's)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def table_toml(
    table_id: str,
    target: str,
    rules: list[RuleSpec],
    stubs: list[Stub],
    input_spec: dict[str, Any],
) -> str:
    """The table text: variant (any source the rules cover -> ``target``), rules, drops (a stub's
    weights, which the generated module has no place for)."""
    lines = [
        "[table]",
        f"id = {_value(table_id)}",
        "version = 1",
        f"description = {_value('written by ckptport port: one rule per Keras layer')}",
        "",
        "[input]",
        f"size = {int(input_spec['size'])}",
        f"range = {_value([float(v) for v in input_spec['range']])}",
        "",
        "[[variants]]",
        f"target = {_value(target)}",
    ]
    for rule in rules:
        lines += ["", "[[rules]]", f"source = {_value(re.escape(rule.layer))}"]
        lines += [f"target = {_value(rule.attr)}", f"transform = {_value(rule.transform)}"]
        lines += [] if rule.tap else ["tap = false"]
        lines += [f"args = {_value(rule.args)}"] if rule.args else []
    for stub in stubs:
        if stub.weights:
            lines += ["", "[[drops]]", f"source = {_value(re.escape(stub.layer))}"]
            lines += [f"reason = {_value('not ported: ' + stub.reason)}"]
    return "\n".join(lines) + "\n"
