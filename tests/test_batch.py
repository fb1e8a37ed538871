"""Many checkpoints in one command (converter/batch.py, cli/convert_many.py): one resolution per
source structure with outputs byte for byte those of converting each file alone, a bad file
reported on its line without stopping the rest, the JSON list, worker processes, the up-front
refusals. Cheap: copies of one cached MobileNetV3Small .weights.h5 (test_cli's fixture), made
to differ by an h5py edit of one kernel."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import h5py
import pytest

from converter import pipeline
from converter.batch import StructureCache, list_sources, output_name
from converter.cli import main
from helpers import assert_clean_error, keras_build_args, make_keras_fixture, sha

EPOCHS = ["epoch_01", "epoch_02", "epoch_03"]
PLACEHOLDER = b"an output that must survive without --force"


@pytest.fixture(scope="module")
def mnv3() -> dict:
    fn, kw, inp = keras_build_args("keras:MobileNetV3Small")
    return make_keras_fixture(fn, kw, inp, ["keras", "weights.h5", "h5"])


def _scale_first_kernel(path: Path, factor: float) -> None:
    """The same structure, other weights: the file's first 4-D dataset scaled."""
    with h5py.File(path, "r+") as f:
        kernels: list[str] = []
        f.visititems(lambda n, o: kernels.append(n) if getattr(o, "ndim", 0) == 4 else None)
        ds = f[kernels[0]]
        ds[...] = ds[...] * factor


@pytest.fixture(scope="module")
def epochs(mnv3, tmp_path_factory) -> Path:
    """A training run's directory: three checkpoints of one structure, a truncated one, a note."""
    d = tmp_path_factory.mktemp("run")
    for n, name in enumerate(EPOCHS):
        shutil.copy(mnv3["files"]["weights.h5"], d / f"{name}.weights.h5")
        _scale_first_kernel(d / f"{name}.weights.h5", 1.0 + n / 10)
    data = Path(mnv3["files"]["weights.h5"]).read_bytes()
    (d / "epoch_04.weights.h5").write_bytes(data[: len(data) // 3])
    (d / "notes.txt").write_text("lr 1e-3\n")
    return d


def test_one_resolution_per_structure_and_the_bytes_of_converting_alone(
    mnv3, epochs, tmp_path, monkeypatch
):
    calls, resolve = [], pipeline.resolve_source

    def counted(raw, *args, **kwargs):
        calls.append(raw.path)
        return resolve(raw, *args, **kwargs)

    monkeypatch.setattr(pipeline, "resolve_source", counted)
    sources = [epochs / f"{name}.weights.h5" for name in EPOCHS] + [Path(mnv3["files"]["keras"])]
    cache = StructureCache()
    batch = [
        pipeline.convert_file(src, tmp_path / f"{n}.safetensors", structures=cache)[1]
        for n, src in enumerate(sources)
    ]
    assert len(calls) == 2 and cache.resolutions == 2 and cache.hits == 2  # .weights.h5, .keras
    assert calls[0] == sources[0] and calls[1] == sources[3]
    alone = pipeline.convert_file(sources[2], tmp_path / "alone.safetensors")[1]
    assert sha(batch[2]) == sha(alone)  # re-bound: the bytes of converting the file alone
    assert len({sha(p) for p in batch[:3]}) == 3  # each file's own tensors


def _run(*args) -> tuple[int, str, str]:
    """``ckptport ARGS`` in-process (module fixtures cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def one_job(epochs, tmp_path_factory) -> tuple[int, str, Path]:
    """The directory converted with --jobs 1, epoch_03's output already there (no --force)."""
    out = tmp_path_factory.mktemp("out")
    (out / "epoch_03.safetensors").write_bytes(PLACEHOLDER)
    rc, stdout, err = _run("convert", epochs, "-o", out)
    assert stdout == ""
    return rc, err, out


def test_a_bad_file_is_reported_on_its_line_and_the_others_are_written(epochs, one_job):
    rc, err, out = one_job
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[0] == "skipped 1 entry that is no checkpoint: notes.txt"
    for name in EPOCHS[:2]:
        assert any(line.startswith(f"converted {epochs / name}.weights.h5 -> ") for line in lines)
        assert (out / f"{name}.safetensors").stat().st_size > 1_000_000
    bad = [line for line in lines if line.startswith("failed")]
    assert len(bad) == 2 and "epoch_03.safetensors exists; pass --force" in bad[0], bad
    assert bad[0].startswith(f"failed    {epochs / 'epoch_03.weights.h5'}: "), bad
    assert bad[1].startswith(f"failed    {epochs / 'epoch_04.weights.h5'} is truncated"), bad
    assert (out / "epoch_03.safetensors").read_bytes() == PLACEHOLDER
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.safetensors" for n in EPOCHS]
    assert lines[-1].startswith("2 of 4 converted in ") and lines[-1].endswith(
        f"2 failed: {epochs / 'epoch_03.weights.h5'}, {epochs / 'epoch_04.weights.h5'}"
    )


def test_jobs_2_writes_the_files_of_jobs_1_and_json_lists_each_file(epochs, one_job):
    _, _, out = one_job
    before = {n: sha(out / f"{n}.safetensors") for n in EPOCHS[:2]}
    rc, stdout, err = _run("convert", epochs, "-o", out, "--jobs", "2", "--force", "--json")
    assert rc == 2 and err == "", err
    listed = json.loads(stdout)
    names = [f"epoch_0{n}.weights.h5" for n in (1, 2, 3, 4)]
    assert [Path(f["source"]).name for f in listed] == names
    assert [f["ok"] for f in listed] == [True, True, True, False]
    assert listed[0]["output"] == str(out / "epoch_01.safetensors") and listed[0]["tensors"] == 244
    assert listed[0]["target"] == "timm:tf_mobilenetv3_small_100" and listed[0]["seconds"] > 0
    assert listed[3]["output"] is None and listed[3]["exit_code"] == 2
    assert "truncated" in listed[3]["error"]
    assert {n: sha(out / f"{n}.safetensors") for n in EPOCHS[:2]} == before
    assert (out / "epoch_03.safetensors").read_bytes() != PLACEHOLDER


def test_output_must_be_an_existing_directory(epochs, tmp_path, cli):
    two = [epochs / "epoch_01.weights.h5", epochs / "epoch_02.weights.h5"]
    rc, _, err = cli("convert", *two, "-o", tmp_path / "out.safetensors")
    assert_clean_error(rc, err, "out.safetensors does not exist", "must be an existing directory")
    (tmp_path / "file").write_text("")
    rc, _, err = cli("convert", *two, "-o", tmp_path / "file")
    assert_clean_error(rc, err, "file is a file", "2 sources")


def test_two_sources_with_one_output_name_are_refused(epochs, tmp_path, cli):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(epochs / "epoch_01.weights.h5", other)
    two = [epochs / "epoch_01.weights.h5", other / "epoch_01.weights.h5"]
    rc, _, err = cli("convert", *two, "-o", tmp_path)
    assert_clean_error(rc, err, "would both be written to", str(tmp_path / "epoch_01.safetensors"))
    assert sorted(tmp_path.iterdir()) == [other]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--verify"], "--verify works on one source and 2 are given"),
        (["--no-verify"], "--no-verify works on one source"),
        (["--to", "model.py:build"], "drafts a mapping, which batch conversion (2 sources)"),
    ],
)
def test_one_source_options_are_refused_with_several(epochs, tmp_path, cli, flags, needle):
    two = [epochs / "epoch_01.weights.h5", epochs / "epoch_02.weights.h5"]
    rc, _, err = cli("convert", *two, "-o", tmp_path, *flags)
    assert_clean_error(rc, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_lists_its_sources_sorted_one_per_checkpoint(tmp_path):
    for name in ["b.keras", "a.weights.h5", "notes.txt", "old.safetensors", "checkpoint", ".c.h5"]:
        (tmp_path / name).write_bytes(b"x")
    for name in ["ckpt-2.index", "ckpt-2.data-00000-of-00001"]:
        (tmp_path / name).write_bytes(b"x")
    saved = tmp_path / "export" / "variables"
    saved.mkdir(parents=True)
    (saved / "variables.index").write_bytes(b"x")
    (saved.parent / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "logs").mkdir()
    sources, skipped = list_sources([tmp_path])
    assert [p.name for p in sources] == ["a.weights.h5", "b.keras", "ckpt-2", "export"]
    assert [p.name for p in skipped] == ["logs", "notes.txt", "old.safetensors"]
    names = ["epoch_05.weights.h5", "model.05-0.12.h5", "ckpt-2", "export", "m.keras", "x.onnx"]
    assert [output_name(Path(n)) for n in names] == [
        "epoch_05.safetensors",
        "model.05-0.12.safetensors",
        "ckpt-2.safetensors",
        "export.safetensors",
        "m.safetensors",
        "x.safetensors",
    ]


def _children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_sigterm_stops_the_workers_and_leaves_only_whole_outputs(mnv3, tmp_path):
    """SIGTERM while --jobs 2 workers convert: exit 143, the workers are gone, and every file in
    the output directory is a whole output (no temporary file left)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from converter import formats

    run = tmp_path / "run"
    run.mkdir()
    for n in range(300):  # hard links: seconds of work for two workers, no disk
        os.link(mnv3["files"]["weights.h5"], run / f"epoch_{n:03d}.weights.h5")
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "converter", "convert", str(run), "-o", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    workers: set[int] = set()
    while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
        workers = {p for p in _children(proc.pid) if b"spawn_main" in
                   Path(f"/proc/{p}/cmdline").read_bytes()}  # fmt: skip (not the resource tracker)
        time.sleep(0.05)
    assert len(workers) == 2, "the workers did not start"
    time.sleep(1.0)  # inside the conversions (each worker imports, then converts)
    assert proc.poll() is None, "the batch ended before the signal: give it more files"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    time.sleep(0.5)
    alive = [p for p in workers if Path(f"/proc/{p}").exists() and
             Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]  # fmt: skip
    assert not alive, f"workers still running: {alive}"
    left = sorted(p.name for p in out.iterdir())
    assert all(name.endswith(".safetensors") for name in left), left
    for name in left:
        assert formats.read(out / name).tensors  # whole files only


def test_output_io_is_decided_once_on_all_the_sources(epochs, one_job, tmp_path, monkeypatch):
    """--output-io auto: each file alone is below the kernel's dirty-background threshold, the
    batch's sources together above it, so every output is written direct; the bytes are the
    buffered ones."""
    from converter.batch import convert_many, source_bytes
    from converter.formats import direct_io, safetensors_file

    _, _, buffered = one_job
    sources = [epochs / f"{name}.weights.h5" for name in EPOCHS[:2]]
    one = source_bytes(sources[0])
    monkeypatch.setattr(direct_io, "dirty_background_bytes", lambda: one + 1)
    made, init = [], safetensors_file.SafetensorsStream.__init__

    def recorded(self, path, layout, direct=False):
        init(self, path, layout, direct)
        made.append(self.direct is not None)

    monkeypatch.setattr(safetensors_file.SafetensorsStream, "__init__", recorded)
    pairs = [(src, tmp_path / output_name(src)) for src in sources]
    assert all(o.ok for o in convert_many(pairs, {"output_io": "auto"}))
    assert made == [True, True]
    for src, out in pairs:
        assert sha(out) == sha(buffered / out.name)
    pipeline.convert_file(sources[0], tmp_path / "alone.safetensors")  # alone: buffered
    assert made == [True, True, False]


def test_source_sizes_count_every_file_of_a_source(tmp_path):
    from converter.batch import source_bytes

    (tmp_path / "ckpt-2.index").write_bytes(b"x" * 10)
    (tmp_path / "ckpt-2.data-00000-of-00001").write_bytes(b"x" * 100)
    (tmp_path / "ckpt-20.index").write_bytes(b"x" * 1000)  # another checkpoint
    (tmp_path / "saved" / "variables").mkdir(parents=True)
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"x" * 3)
    (tmp_path / "saved" / "variables" / "variables.data-00000-of-00001").write_bytes(b"x" * 4)
    assert source_bytes(tmp_path / "ckpt-2") == 110
    assert source_bytes(tmp_path / "saved") == 7
    assert source_bytes(tmp_path / "ckpt-2.index") == 10


def test_a_bad_output_io_is_refused_by_the_cli(epochs, tmp_path, cli):
    rc, _, err = cli("convert", epochs / "epoch_01.weights.h5", "--output-io", "fast")
    assert rc == 2 and "Invalid value for '--output-io'" in err


def test_skip_existing_converts_only_what_is_new(epochs, tmp_path):
    """A training run still writing checkpoints: rerun with --skip-existing, the outputs already
    there are named and left as they are, the new files converted; a failure still fails."""
    first = epochs / "epoch_01.weights.h5"
    rc, _, err = _run("convert", first, epochs / "epoch_02.weights.h5", "-o", tmp_path)
    assert rc == 0, err
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    rc, _, err = _run("convert", epochs, "-o", tmp_path, "--skip-existing")
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    out = tmp_path / "epoch_01.safetensors"
    assert f"skipped   {first}: {out} exists (--skip-existing)" in lines
    assert any(line.startswith(f"converted {epochs / 'epoch_03.weights.h5'} -> ") for line in lines)
    assert lines[-1].startswith("1 of 4 converted, 2 skipped (their outputs exist) in ")
    assert lines[-1].endswith(f"1 failed: {epochs / 'epoch_04.weights.h5'}")
    assert {p.name: (sha(p), p.stat().st_mtime_ns) for p in tmp_path.iterdir()
            if p.name in before} == before  # fmt: skip
    rc, stdout, _ = _run("convert", epochs, "-o", tmp_path, "--skip-existing", "--json")
    listed = {Path(f["source"]).name: f for f in json.loads(stdout)}
    assert listed["epoch_03.weights.h5"] == {
        "source": str(epochs / "epoch_03.weights.h5"),
        "ok": True,
        "skipped": True,
        "seconds": 0.0,
        "output": str(tmp_path / "epoch_03.safetensors"),
    }
    assert not listed["epoch_04.weights.h5"]["ok"]


def test_skip_existing_one_source_and_its_conflict_with_force(epochs, tmp_path, cli):
    src, out = epochs / "epoch_01.weights.h5", tmp_path / "e1.safetensors"
    out.write_bytes(PLACEHOLDER)
    rc, stdout, err = cli("convert", src, "-o", out, "--skip-existing")
    assert rc == 0 and stdout == "" and err.strip() == f"skipped   {src}: {out} exists (--skip-existing)"
    assert out.read_bytes() == PLACEHOLDER
    rc, _, err = cli("convert", src, "-o", out, "--skip-existing", "--force")
    assert_clean_error(rc, err, "--skip-existing", "--force")
