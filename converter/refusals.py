"""Refusals: Keras architectures ckptport recognises but will not convert, because no PyTorch model
computes the same function (``mappings/refusals.toml``, data like the tables).

Each refused source has a shipped source manifest, so every format is recognised by structure;
``convert`` then fails with the refusal's one line (what differs structurally, the closest PyTorch
model and how it differs, what the user can do) instead of "no mapping table fits".
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MappingError, RegistryError
from .manifest import manifest_path, source_manifest
from .registry import Registry

REFUSAL_KEYS = ("sources", "reason", "closest", "differs", "remedy")
OPTIONAL_KEYS = ("head",)  # the classifier layer (regex), as a table's [head] source


@dataclass(frozen=True)
class Refusal:
    """``[[refusals]]`` entry: the source manifest ids it covers, four one-line texts and the
    classifier layer (``head``, a regex: re-headed, headless and nested builds are recognised by
    structure without it, as a table's ``[head]`` lets them be)."""

    sources: tuple[str, ...]
    reason: str
    closest: str
    differs: str
    remedy: str
    head: str | None = None

    def message(self, label: str) -> str:
        """The one line ``convert`` fails with; ``label`` names the file and its architecture."""
        return (
            f"{label} is recognised but has no exact PyTorch twin: {self.reason}. Closest:"
            f" {self.closest}; {self.differs}. To convert anyway: {self.remedy}"
        )


def _fail(path: Path, msg: str) -> MappingError:
    return MappingError(f"refusals file {path}: {msg}")


def _entry(path: Path, i: int, data: Any) -> Refusal:
    where = f"refusals[{i}]"
    if not isinstance(data, dict):
        raise _fail(path, f"{where} must be a table with {', '.join(REFUSAL_KEYS)}")
    missing = [k for k in REFUSAL_KEYS if k not in data]
    unknown = sorted(set(data) - set(REFUSAL_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise _fail(
            path, f"{where}: missing {missing}, unknown {unknown}; keys: {', '.join(REFUSAL_KEYS)}"
        )
    sources = data["sources"]
    if not (isinstance(sources, list) and sources and all(isinstance(s, str) for s in sources)):
        raise _fail(path, f"{where}: sources must be a non-empty list of source manifest ids")
    for key in REFUSAL_KEYS[1:]:
        text = data[key]
        if not (isinstance(text, str) and text.strip() and "\n" not in text):
            raise _fail(path, f"{where}: {key} must be one non-empty line of text")
    for mid in sources:
        if not manifest_path(mid).is_file():
            raise _fail(
                path,
                f"{where}: no shipped manifest for {mid!r} ({manifest_path(mid).name}), so it"
                " could not be recognised; add it to fixtures/gen_manifests.py SOURCES and run"
                f" `python fixtures/gen_manifests.py --only {mid}`",
            )
    head = data.get("head")
    if head is not None and not (isinstance(head, str) and _is_regex(head)):
        raise _fail(path, f"{where}: head must be a regex naming the classifier layer")
    return Refusal(tuple(sources), *(data[k].strip() for k in REFUSAL_KEYS[1:]), head=head)


def _is_regex(text: str) -> bool:
    import re

    try:
        re.compile(text)
    except re.error:
        return False
    return bool(text)


def load_refusals(path: str | Path) -> Registry[Refusal]:
    """Parse and validate a refusals file: a registry of its refusals by source manifest id (a
    source listed twice is an error naming both)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise MappingError(f"refusals file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise _fail(p, f"not valid TOML ({exc})") from None
    if data.get("version") != 1 or not isinstance(data.get("refusals"), list):
        raise _fail(p, "needs version = 1 and [[refusals]] entries")
    registry: Registry[Refusal] = Registry("refused source")
    for i, entry in enumerate(data["refusals"]):
        refusal = _entry(p, i, entry)
        for mid in refusal.sources:
            try:
                registry.add(mid, refusal)
            except RegistryError as exc:
                raise _fail(p, f"refusals[{i}]: {exc}") from None
    return registry


def builtin_refusals_path() -> Path:
    return Path(str(resources.files("converter.mappings") / "refusals.toml"))


@lru_cache(maxsize=1)
def builtin_refusals() -> Registry[Refusal]:
    return load_refusals(builtin_refusals_path())


def refusal_for(manifest_id: str | None) -> Refusal | None:
    """The built-in refusal of this source manifest, if it is a refused one."""
    refusals = builtin_refusals()
    return refusals.get(manifest_id) if manifest_id in refusals else None


def refused_manifests() -> list[dict[str, Any]]:
    """The refused sources' manifests, so that every format of them is recognised."""
    return [source_manifest(mid) for mid in builtin_refusals()]


def refusal_heads() -> dict[str, Any]:
    """Each refused source's classifier (a ``converter.nesting.HeadSpec``), where given."""
    from .nesting import HeadSpec

    return {mid: HeadSpec(r.head) for mid, r in builtin_refusals().in_order() if r.head}


def unique_refusals() -> list[Refusal]:
    """Each built-in refusal once, in file order (for the README matrix)."""
    return list(dict.fromkeys(r for _, r in builtin_refusals().in_order()))
