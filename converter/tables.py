"""Mapping tables: one TOML file per architecture family under ``mappings/`` (data, not code).

A table has variants (source manifest -> target spec, surgeries, lookups), rules (regex on the Keras
layer name -> target module template, named transform) and drops (layers that are not weights of the
target: preprocessing becomes a recorded spec). First matching rule wins. Placeholders in templates:
``{g}`` a regex group, ``{g-1}``/``{g+1}`` integer arithmetic, ``{g:alpha}`` a letter as index
(a -> 0), ``{g@name}`` the variant's lookup list ``name`` at index g, ``{$name}`` a variant
constant.
"""

from __future__ import annotations

import json

import re
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MappingError, RegistryError
from .registry import Registry
from .surgeries import SURGERIES
from .transforms import TRANSFORMS, LayerTransform

_PLACEHOLDER = re.compile(
    r"\{(?P<ref>\$?\w+)(?::(?P<conv>alpha|int))?(?P<off>[+-]\d+)?(?:@(?P<lookup>\w+))?\}"
)
DROP_KINDS = ("preprocessing", "ignore")


@dataclass
class Rule:
    """``[[rules]]`` entry: source layers matching ``source`` become target module ``target``
    (a template) through layer transform ``transform``; ``tap``/``tap_module`` say what
    verification compares, ``fold_bias`` where a bias the target lacks goes, ``args`` the
    transform's arguments."""

    source: re.Pattern[str]
    target: str
    transform: LayerTransform
    fold_bias: str | None = None
    tap: bool | str = True  # False: not comparable; a template: compare that source layer instead
    tap_module: str | None = (
        None  # template: hook this target module instead ({target} = rendered target)
    )
    args: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"{self.source.pattern} -> {self.target} [{self.transform.name}]"


@dataclass
class Drop:
    """``[[drops]]`` entry: source layers matching ``source`` that are not target weights;
    ``kind`` ``preprocessing`` records them (converter/preprocessing.py), ``ignore`` only lists
    them as dropped, with ``reason``."""

    source: re.Pattern[str]
    kind: str
    reason: str = ""


@dataclass
class Variant:
    """``[[variants]]`` entry: one source manifest -> one target spec, with the surgeries the target
    needs, the lookups and constants its templates use, and the target's constructor kwargs."""

    source: str | None  # source manifest id; None: any source whose layers the rules cover
    target: str
    surgeries: list[dict[str, Any]] = field(default_factory=list)
    lookups: dict[str, list[str]] = field(default_factory=dict)
    consts: dict[str, Any] = field(default_factory=dict)
    target_kwargs: dict[str, Any] = field(default_factory=dict)
    # True: only for a base nested in the user's model (the user pools after the base's last
    # layer); False: only for a stand-alone build; None: either
    nested: bool | None = None

    def fits(self, source: Any) -> bool:
        """Whether this variant computes ``source``'s form (nested or stand-alone)."""
        return self.nested is None or self.nested == bool(getattr(source, "nesting", None))


@dataclass
class Table:
    """One mapping table file: its variants, rules (first match wins), drops, the classifier head
    (for ``num_classes``) and the input the source expects (size, value range)."""

    id: str
    version: int
    family: str
    description: str
    variants: list[Variant]
    rules: list[Rule]
    drops: list[Drop]
    path: Path
    head: dict[str, Any] = field(
        default_factory=dict
    )  # see _head: source, module, top, top_modules, pool
    input: dict[str, Any] = field(default_factory=lambda: {"size": 224, "range": [0.0, 255.0]})
    verify: dict[str, Any] = field(default_factory=dict)  # see _verify: rtol
    # a drafted table's record of its target (see _target_record): target, sha256, manifest
    target_record: dict[str, Any] | None = None

    def match(self, layer_name: str) -> tuple[Rule, re.Match[str]] | tuple[Drop, None] | None:
        """The first rule whose pattern matches the whole name (with its match), else the first
        drop, else None."""
        for rule in self.rules:
            m = rule.source.fullmatch(layer_name)
            if m:
                return rule, m
        for drop in self.drops:
            if drop.source.fullmatch(layer_name):
                return drop, None
        return None

    def variants_for(self, source_id: str | None) -> list[Variant]:
        return [v for v in self.variants if v.source is None or v.source == source_id]


def render(
    template: str, m: re.Match[str] | None, variant: Variant, where: str, **extra: str
) -> str:
    """Fill a template's placeholders (see the module docstring) from the match ``m``, the
    variant's constants and lookups, and ``extra``; ``where`` names the rule in errors."""
    groups = {**(m.groupdict() if m else {}), **extra}

    def sub(ph: re.Match[str]) -> str:
        ref = ph["ref"]
        if ref.startswith("$"):
            if ref[1:] not in variant.consts:
                raise MappingError(f"{where}: variant {variant.target} has no constant {ref[1:]!r}")
            val: Any = variant.consts[ref[1:]]
        else:
            val = groups.get(ref)
            if val is None:
                raise MappingError(f"{where}: group {ref!r} did not match anything")
        if ph["conv"] == "alpha":
            val = ord(str(val)) - ord("a")
        if ph["off"]:
            val = int(val) + int(ph["off"])
        if ph["lookup"]:
            table = variant.lookups.get(ph["lookup"])
            if table is None or not (0 <= int(val) < len(table)):
                raise MappingError(
                    f"{where}: lookup {ph['lookup']}[{val}] is not defined for {variant.target}"
                )
            val = table[int(val)]
        return str(val)

    return _PLACEHOLDER.sub(sub, template)


# ------------------------------------------------------------------ loading


def _fail(path: Path, msg: str) -> MappingError:
    return MappingError(f"mapping table {path}: {msg}")


def _regex(path: Path, pattern: Any, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise _fail(path, f"{where}: source must be a string regex")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise _fail(path, f"{where}: bad pattern {pattern!r} ({exc})") from None


def _input(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    spec = {"size": 224, "range": [0.0, 255.0], **data.get("input", {})}
    lo, hi = spec["range"]
    if not (isinstance(spec["size"], int) and spec["size"] > 0 and lo < hi):
        raise _fail(p, "[input] needs size (int > 0) and range = [low, high] with low < high")
    return spec


def _verify(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``[verify] rtol``: the family's float32 tolerance for ``ckptport verify`` when the network's
    own float32 rounding (PyTorch float32 vs float64 on the same weights) exceeds the default."""
    spec = data.get("verify", {})
    if not isinstance(spec, dict) or set(spec) - {"rtol"}:
        raise _fail(p, "[verify] takes only rtol (a float in (0, 1))")
    rtol = spec.get("rtol", 1e-4)
    if not (isinstance(rtol, float) and 0 < rtol < 1):
        raise _fail(p, "[verify] rtol must be a float in (0, 1)")
    return dict(spec)


def _target_record(p: Path, data: dict[str, Any]) -> dict[str, Any] | None:
    """``[target_manifest]`` (a drafted table): the user's module as drafted (``target`` spec, the
    ``sha256`` of its file, its manifest as ``json``), so that converting with the table needs no
    PyTorch while the file is unchanged."""
    spec = data.get("target_manifest")
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != {"target", "sha256", "json"}:
        raise _fail(p, "[target_manifest] takes target, sha256 and json (delete it to rebuild)")
    try:
        manifest = json.loads(spec["json"])
    except (TypeError, json.JSONDecodeError) as exc:
        raise _fail(p, f"[target_manifest] json is not valid JSON ({exc}); delete it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("tensors"), list):
        raise _fail(p, "[target_manifest] json lists no tensors; delete the section to rebuild")
    return {"target": spec["target"], "sha256": spec["sha256"], "manifest": manifest}


def load_table(path: str | Path) -> Table:
    """Parse and validate a table file; any error names the file, the entry and the fix."""
    p = Path(path)
    return table_from_data(p, _read_toml(p))


def loads_table(text: str, label: str | Path) -> Table:
    """Parse and validate a table given as TOML text (a drafted one); errors name ``label``."""
    p = Path(label)
    try:
        return table_from_data(p, tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise _fail(p, f"not valid TOML ({exc})") from None


def table_from_data(p: Path, data: dict[str, Any]) -> Table:
    """Validate parsed TOML ``data`` as the table at ``p``."""
    for key in ("id", "version"):
        if key not in data.get("table", {}):
            raise _fail(p, f"[table] needs {key!r}")
    variants = _variants(p, data)
    rules = _rules(p, data, variants)
    drops = _drops(p, data)
    head = _head(p, data)
    info = data["table"]
    return Table(
        info["id"],
        int(info["version"]),
        info.get("family", info["id"]),
        info.get("description", ""),
        variants,
        rules,
        drops,
        p,
        head,
        _input(p, data),
        _verify(p, data),
        _target_record(p, data),
    )


def _read_toml(p: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise MappingError(f"mapping table {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(p, f"not valid TOML ({exc})") from None


def _variants(p: Path, data: dict[str, Any]) -> list[Variant]:
    variants = []
    for i, v in enumerate(data.get("variants", [])):
        if "target" not in v:
            raise _fail(p, f"variants[{i}] needs a target spec like 'timm:tf_efficientnet_b0'")
        for s in v.get("surgeries", []):
            try:
                SURGERIES.get(s["name"])
            except RegistryError as exc:
                raise _fail(p, f"variants[{i}]: {exc}") from None
        variants.append(
            Variant(
                v.get("source"),
                v["target"],
                v.get("surgeries", []),
                v.get("lookups", {}),
                v.get("consts", {}),
                v.get("target_kwargs", {}),
                _nested(p, i, v),
            )
        )
    if not variants:
        raise _fail(p, "no [[variants]]: say which source maps to which target")
    return variants


def _nested(p: Path, i: int, v: dict[str, Any]) -> bool | None:
    nested = v.get("nested")
    if nested is not None and not isinstance(nested, bool):
        raise _fail(p, f"variants[{i}]: nested must be true or false (leave it out for either)")
    return nested


RULE_KEYS = {"source", "target", "transform", "fold_bias", "tap", "tap_module", "args"}


def _rules(p: Path, data: dict[str, Any], variants: list[Variant]) -> list[Rule]:
    rules = []
    seen_targets: dict[str, str] = {}
    for i, r in enumerate(data.get("rules", [])):
        where = f"rules[{i}] ({r.get('source')!r})"
        pattern = _regex(p, r.get("source"), where)
        if "target" not in r or "transform" not in r:
            raise _fail(p, f"{where} needs target and transform")
        try:
            transform = TRANSFORMS.get(r["transform"])
        except RegistryError as exc:
            raise _fail(p, f"{where}: {exc}") from None
        tap = r.get("tap") if isinstance(r.get("tap"), str) else None
        for template in filter(None, [r["target"], r.get("fold_bias"), tap, r.get("tap_module")]):
            _check_template(p, where, template, pattern, variants)
        if r["target"] in seen_targets:
            raise _fail(
                p, f"{where}: duplicate target {r['target']!r} (also {seen_targets[r['target']]})"
            )
        seen_targets[r["target"]] = where
        unknown = set(r) - RULE_KEYS
        if unknown:
            raise _fail(p, f"{where}: unknown keys {sorted(unknown)}")
        rules.append(
            Rule(
                pattern,
                r["target"],
                transform,
                r.get("fold_bias"),
                r.get("tap", True),
                r.get("tap_module"),
                r.get("args", {}),
            )
        )
    return rules


def _check_template(
    p: Path, where: str, template: str, pattern: re.Pattern[str], variants: list[Variant]
) -> None:
    """Every placeholder refers to a group of the pattern, or to a constant or lookup that every
    variant has."""
    for ph in _PLACEHOLDER.finditer(template):
        ref = ph["ref"]
        if ref == "target":
            continue
        if ref.startswith("$"):
            missing = [v.target for v in variants if ref[1:] not in v.consts]
            if missing:
                raise _fail(p, f"{where}: constant {ref} is missing in variants {missing}")
        elif ref not in pattern.groupindex:
            raise _fail(p, f"{where}: template {template!r} uses group {ref!r}, not in the pattern")
        if ph["lookup"]:
            missing = [v.target for v in variants if ph["lookup"] not in v.lookups]
            if missing:
                raise _fail(p, f"{where}: lookup {ph['lookup']!r} is missing in variants {missing}")


def _drops(p: Path, data: dict[str, Any]) -> list[Drop]:
    drops = []
    for i, d in enumerate(data.get("drops", [])):
        kind = d.get("as", "ignore")
        if kind not in DROP_KINDS:
            raise _fail(p, f"drops[{i}]: as={kind!r}; valid: {', '.join(DROP_KINDS)}")
        drops.append(Drop(_regex(p, d.get("source"), f"drops[{i}]"), kind, d.get("reason", "")))
    return drops


HEAD_KEYS = {"source", "module"}
HEAD_OPTIONAL = {"top", "top_modules", "pool", "init_kwargs"}


def _head(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``[head]``: ``source`` regex of the classifier layer, ``module`` the target's classifier;
    optional ``top`` regex of the other weighted layers only include_top=True builds have,
    ``top_modules`` the target modules that compute them (identity in a headless target) and
    ``pool`` the torchvision target's global pooling module (default ``avgpool``)."""
    head = data.get("head", {})
    if head:
        if not HEAD_KEYS <= set(head) <= HEAD_KEYS | HEAD_OPTIONAL:
            raise _fail(
                p,
                "[head] needs source (regex of the classifier layer) and module (target module); "
                f"optional: {', '.join(sorted(HEAD_OPTIONAL))}",
            )
        _regex(p, head["source"], "[head]")
        if "top" in head:
            _regex(p, head["top"], "[head] top")
        if not all(isinstance(m, str) for m in head.get("top_modules", [])):
            raise _fail(p, "[head] top_modules must be a list of target module names")
    return head


TABLES: Registry[Table] = Registry("mapping table")


NOT_TABLES = (
    "refusals.toml",
)  # data beside the tables that is not a table (converter/refusals.py)


def builtin_table_paths() -> list[Path]:
    root = Path(str(resources.files("converter.mappings")))
    return sorted(p for p in root.glob("*.toml") if p.name not in NOT_TABLES)


@lru_cache(maxsize=1)
def _load_builtins() -> None:
    for path in builtin_table_paths():
        table = load_table(path)
        TABLES.add(table.id, table)


def builtin_tables() -> list[Table]:
    _load_builtins()
    return [t for _, t in TABLES.items()]


def load_tables(mapping: str | Path | None = None) -> list[Table]:
    """The tables a conversion chooses from: the user's ``mapping`` file alone, or the built-in
    ones."""
    return [load_table(mapping)] if mapping else builtin_tables()


def get_table(table_id: str) -> Table:
    _load_builtins()
    return TABLES.get(table_id)
