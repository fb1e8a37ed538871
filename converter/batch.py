"""Many checkpoints in one command (``ckptport convert ckpts/*.h5 -o outdir/``): the sources listed,
their output names, the per-structure cache and the worker pool.

A training run's checkpoints share one structure: the same tensor keys, shapes and dtypes, the same
model config. :class:`StructureCache` resolves the first file of a structure (detection, the table
and variant choice, the target manifest) and re-binds that resolution to the next files' tensors
(``converter.source.rebind``), so each of them only reads, transforms and writes. The outputs are
byte for byte those of converting each file alone. Workers are processes, each with its own cache;
the library stays silent (``on_done`` is called per file)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .errors import ConverterError, ExitCode, OutputExistsError, SourceFormatError, cli_message

if TYPE_CHECKING:
    from .formats import RawCheckpoint
    from .pipeline import ConversionResult
    from .source import SourceModel

OUTPUT_SUFFIX = ".safetensors"
PYTORCH_SIDE = ("safetensors", "pt")  # our own outputs: never sources of a batch


# ------------------------------------------------------------------ the per-structure cache


def structure_signature(raw: RawCheckpoint) -> str:
    """What resolving ``raw`` depends on, as a digest: every field of the read checkpoint (format,
    each tensor's key, shape and dtype in file order, model config, group names, ignored keys,
    object paths, notes, EMA shadows, ...) except its path, private state (the file's digest)
    and the tensors' data."""
    h = hashlib.sha256()
    for f in dataclasses.fields(raw):
        if f.name == "path" or f.name.startswith("_"):  # the digest, its hashing thread, ...
            continue
        h.update(f.name.encode() + b"\0")
        h.update(json.dumps(getattr(raw, f.name), default=_canonical).encode() + b"\0")
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    """JSON for what ``json.dumps`` does not know: a tensor as its key, shape and dtype."""
    from .formats import RawTensor

    if isinstance(value, RawTensor):
        return [value.key, list(value.shape), str(value.dtype)]
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return repr(value)  # an object repr with an address makes a miss: slower, never wrong


@dataclass
class StructureCache:
    """Per source structure: the resolved source and what the pipeline derived from it
    (``once``). ``resolutions`` counts the sources resolved, ``hits`` those re-bound."""

    resolutions: int = 0
    hits: int = 0
    _sources: dict[str, SourceModel] = field(default_factory=dict, repr=False)
    _steps: dict[tuple[str, Any], Any] = field(default_factory=dict, repr=False)
    _keys: dict[int, str] = field(default_factory=dict, repr=False)  # id(source) -> its key

    def source(
        self, raw: RawCheckpoint, resolve: Callable[[RawCheckpoint], SourceModel], context: Any
    ) -> SourceModel:
        """``raw`` resolved: ``resolve(raw)`` for the first file of its structure (under
        ``context``: the tables and options resolution depends on), else the cached resolution
        re-bound to ``raw``'s tensors."""
        from .source import rebind

        key = structure_signature(raw) + json.dumps(context, default=_canonical)
        key = hashlib.sha256(key.encode()).hexdigest()
        if key in self._sources:
            self.hits += 1
            source = rebind(self._sources[key], raw)
        else:
            self.resolutions += 1
            source = resolve(raw)
            self._sources[key] = detached(source)
        self._keys = {id(source): key}  # the file being converted (ids of freed ones are reused)
        return source

    def once(self, source: SourceModel, step: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` for the first file of ``source``'s structure, its value afterwards
        (``step`` names what is computed; values are shared: never modify them)."""
        if id(source) not in self._keys:  # not resolved through this cache: nothing to share
            return compute()
        key = (self._keys[id(source)], step)
        if key not in self._steps:
            self._steps[key] = compute()
        return self._steps[key]


def detached(source: SourceModel) -> SourceModel:
    """``source`` without its file's tensors (``rebind`` reads the layers' keys, the ignored keys
    and notes): a cached resolution keeps no file open and no tensor loaded."""
    raw = dataclasses.replace(
        source.raw,
        tensors={},
        shadows={},
        ignored=dict(source.raw.ignored),
        notes=list(source.raw.notes),
    )
    layers = [dataclasses.replace(lay, weights={}) for lay in source.layers]
    return dataclasses.replace(source, raw=raw, layers=layers)


# ------------------------------------------------------------------ what to convert, and where


def list_sources(args: list[Path]) -> tuple[list[Path], list[Path]]:
    """The sources the arguments name, and the files a listed directory holds that are no
    source. A file, a TF checkpoint prefix or ``.index``, a checkpoint directory or a SavedModel
    is one source; another directory stands for its checkpoint files and source directories,
    sniffed, sorted by name (a TF checkpoint's ``.index`` and data shards: one source, its
    prefix; PyTorch-side files, ours included, skipped; hidden ones not looked at)."""
    from . import formats

    sources, skipped = [], []
    for arg in args:
        if not arg.is_dir() or _sniffs(arg, formats):
            sources.append(arg)
            continue
        found, other = _directory_sources(arg, formats)
        if not found:
            raise SourceFormatError(
                f"{arg}: a directory with no checkpoint in it (neither a SavedModel nor a TF"
                f" checkpoint directory, and none of its {len(other)} entries is one)"
            )
        sources += found
        skipped += other
    return sources, skipped


def _directory_sources(folder: Path, formats: Any) -> tuple[list[Path], list[Path]]:
    """(sources, other entries) of one directory (see ``list_sources``)."""
    found, other = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue  # hidden, as ls has it (an unfinished write's temporary file among them)
        if entry.name.endswith(".index"):
            found.append(entry.with_name(entry.name[: -len(".index")]))
        elif ".data-" in entry.name or entry.name == "checkpoint":
            continue  # a TF checkpoint's shards and state file: listed by its .index
        elif _claimed(entry, formats) or _sniffs(entry, formats):
            found.append(entry)
        else:
            other.append(entry)
    return found, other


def _sniffs(path: Path, formats: Any) -> bool:
    """Whether ``path`` reads as a source format (a damaged file named like one: see _claimed)."""
    try:
        return formats.sniff(path) not in PYTORCH_SIDE
    except ConverterError:
        return False


def _claimed(path: Path, formats: Any) -> bool:
    """A file named like a source format (``.keras``, ``.h5``, ``.onnx``, ...): a source even when
    damaged, so that its conversion reports it."""
    return path.is_file() and any(
        fmt.can_read and name not in PYTORCH_SIDE and path.name.endswith(fmt.extensions)
        for name, fmt in formats.FORMATS.in_order()
    )


def output_name(src: Path) -> str:
    """``<stem>.safetensors``: the source's name without its format's extension (``epoch_05
    .weights.h5`` -> ``epoch_05``, ``model.05-0.12.h5`` -> ``model.05-0.12``, a TF prefix
    ``ckpt-5`` -> ``ckpt-5``, a SavedModel directory by its name)."""
    from .formats import FORMATS

    name = src.name
    endings = [e for _, f in FORMATS.in_order() for e in f.extensions if e.startswith(".")]
    for ending in sorted(endings, key=len, reverse=True):
        if name.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)] + OUTPUT_SUFFIX
    return name + OUTPUT_SUFFIX


def plan_outputs(sources: list[Path], outdir: Path) -> list[tuple[Path, Path]]:
    """(source, output) pairs in ``outdir``; refused up front when it is not a directory or two
    sources map to one output name."""
    if not outdir.is_dir():
        what = "is a file" if outdir.exists() else "does not exist"
        raise OutputExistsError(
            f"-o {outdir} {what}: with {len(sources)} sources it must be an existing directory"
            " (mkdir it first); each source becomes DIR/<name>.safetensors"
        )
    pairs = [(src, outdir / output_name(src)) for src in sources]
    by_output: dict[Path, Path] = {}
    for src, out in pairs:
        if out in by_output:
            raise OutputExistsError(
                f"{by_output[out]} and {src} would both be written to {out}; convert them"
                " separately (-o names each output) or rename one"
            )
        by_output[out] = src
    return pairs


# ------------------------------------------------------------------ converting them


@dataclass
class FileOutcome:
    """One source's conversion: its output and summary, or the error (one line) and exit code."""

    source: Path
    output: Path | None
    seconds: float
    info: dict[str, Any] | None = None  # ``summarize(result, output)``
    error: str | None = None
    exit_code: int = ExitCode.OK
    skipped: bool = False  # its output existed (``skip_existing``): left as it is

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        head = {"source": str(self.source), "ok": self.ok, "seconds": round(self.seconds, 3)}
        if self.skipped:
            return {**head, "skipped": True, "output": str(self.output)}
        if self.ok:
            return {**head, **(self.info or {})}
        return {**head, "output": None, "error": self.error, "exit_code": int(self.exit_code)}


def basic_summary(result: ConversionResult, output: Path) -> dict[str, Any]:
    """What a file's outcome carries by default (the CLI passes its own summary)."""
    return {
        "output": str(output),
        "source_arch": result.source_arch,
        "target": result.target,
        "table": result.table_id,
        "tensors": len(result.state_dict),
    }


_WORKER_CACHE: StructureCache | None = None  # each worker process's own


def convert_one(
    src: Path,
    out: Path,
    options: dict[str, Any],
    summarize: Callable[[ConversionResult, Path], dict] = basic_summary,
    structures: StructureCache | None = None,
) -> FileOutcome:
    """Convert and write one source (``converter.pipeline.convert_file`` with ``options``); a
    failure is its outcome, not an exception (a bug's message says so)."""
    from .pipeline import convert_file

    global _WORKER_CACHE
    if structures is None:
        _WORKER_CACHE = _WORKER_CACHE or StructureCache()
        structures = _WORKER_CACHE
    start = time.perf_counter()
    try:
        result, written = convert_file(src, out, structures=structures, **options)
    except ConverterError as err:
        return FileOutcome(
            src, None, _since(start), error=cli_message(err), exit_code=err.exit_code
        )
    except Exception as exc:  # a bug: named as one, the other files still converted
        why = f"internal error: {type(exc).__name__}: {exc}; this is a bug in ckptport"
        return FileOutcome(src, None, _since(start), error=why, exit_code=ExitCode.INTERNAL)
    return FileOutcome(src, written, _since(start), info=summarize(result, written))


def _since(start: float) -> float:
    return time.perf_counter() - start


def convert_many(
    pairs: list[tuple[Path, Path]],
    options: dict[str, Any],
    jobs: int = 1,
    on_done: Callable[[FileOutcome], None] | None = None,
    summarize: Callable[[ConversionResult, Path], dict] = basic_summary,
) -> list[FileOutcome]:
    """Convert each (source, output) pair with ``options`` (those of ``convert_file``: ``to``,
    ``force``, ``mapping``, ...): in this process (``jobs`` 1) or in ``jobs`` worker processes,
    each with its own StructureCache; an output that exists without ``force`` fails at once.
    ``on_done`` is called as each finishes; returns the outcomes in the order of ``pairs``.
    ``summarize`` must be a module-level function (it is sent to the workers). With the option
    ``skip_existing``, a pair whose output exists is skipped (its outcome says so) instead."""
    on_done = on_done or (lambda outcome: None)
    options = dict(options)
    skip = options.pop("skip_existing", False)
    outcomes = [_refused_output(src, out, options, skip) for src, out in pairs]
    sources = [src for (src, _), outcome in zip(pairs, outcomes) if outcome is None]
    options["output_io"] = output_io(options, sources)  # on what will be converted
    for outcome in outcomes:
        if outcome is not None:
            on_done(outcome)
    todo = [n for n, outcome in enumerate(outcomes) if outcome is None]
    if jobs <= 1 or len(todo) <= 1:
        structures = StructureCache()
        for n in todo:
            outcomes[n] = convert_one(*pairs[n], options, summarize, structures)
            on_done(outcomes[n])
    else:
        _in_workers(pairs, todo, outcomes, options, min(jobs, len(todo)), on_done, summarize)
    return [outcome for outcome in outcomes if outcome is not None]


def output_io(options: dict[str, Any], sources: list[Path]) -> str:
    """How the batch writes its outputs: the ``output_io`` option, ``auto`` decided once for
    the whole batch on the sources' total size (formats.direct_io.choose: the outputs of a
    training run's checkpoints are about as large as they are)."""
    from .formats.direct_io import check_mode, choose

    mode = check_mode(options.get("output_io", "auto"))  # refused before any worker starts
    if mode != "auto":
        return mode
    return "direct" if choose(mode, sum(map(source_bytes, sources))) else "buffered"


def source_bytes(src: Path) -> int:
    """The size of a source: a file's, a directory's files', a TF checkpoint prefix's files'."""
    if src.is_file():
        return src.stat().st_size
    files = src.rglob("*") if src.is_dir() else src.parent.glob(glob.escape(src.name) + ".*")
    return sum(f.stat().st_size for f in files if f.is_file())


def _refused_output(
    src: Path, out: Path, options: dict[str, Any], skip: bool
) -> FileOutcome | None:
    """The outcome of a file whose output may not be written (it exists, no ``force``) or is
    skipped (it exists, ``skip``), else None: checked before any worker starts."""
    from .formats import check_output

    if skip and out.is_file():
        return FileOutcome(src, out, 0.0, skipped=True)
    try:
        check_output(out, bool(options.get("force")), (src,))
    except ConverterError as err:
        return FileOutcome(src, None, 0.0, error=cli_message(err), exit_code=err.exit_code)
    return None


def _in_workers(pairs, todo, outcomes, options, jobs: int, on_done, summarize) -> None:
    """Fill ``outcomes`` at the indices ``todo`` from a pool of ``jobs`` spawned processes (no
    state inherited from this one: no framework imported here reaches them); Ctrl-C or SIGTERM
    stops them too, a write in progress removing its temporary file."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    others = set(multiprocessing.active_children())  # the caller's, left alone on interrupt
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker)
    try:
        futures = {pool.submit(convert_one, *pairs[n], options, summarize): n for n in todo}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                n = futures[future]
                outcomes[n] = _outcome_of(future, pairs[n][0])
                on_done(outcomes[n])
    except BaseException:  # Ctrl-C, SIGTERM: the workers stop too (a write removes its temp file)
        for process in set(multiprocessing.active_children()) - others:  # the pool's workers
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def start_worker() -> None:
    """A worker process's set-up: glibc keeps freed tensor buffers (converter.allocator), the
    conversion's modules are imported, and what they made is frozen out of the garbage
    collector's full collections, which would otherwise walk every module object again each time
    a conversion's allocations trigger one."""
    import gc

    from . import pipeline  # noqa: F401  (imported here, before the freeze)
    from .allocator import reuse_freed_buffers

    reuse_freed_buffers()
    gc.freeze()


def _outcome_of(future: Any, src: Path) -> FileOutcome:
    """A worker's outcome; a worker that died (killed, out of memory) is that file's failure."""
    try:
        return future.result()
    except Exception as exc:
        why = f"its worker process died ({type(exc).__name__}: {exc}); rerun it with --jobs 1"
        return FileOutcome(src, None, 0.0, error=why, exit_code=ExitCode.INTERNAL)


def default_jobs(jobs: int) -> int:
    """``--jobs``: N processes, 0 for one per CPU."""
    return jobs if jobs > 0 else (os.cpu_count() or 1)


def exit_code(outcomes: list[FileOutcome]) -> int:
    """0 when every file converted, else the worst failure's code (2: bad input; 70: a bug)."""
    return max((int(o.exit_code) for o in outcomes), default=int(ExitCode.OK))
