"""converter.bn.recalibrate (precise BN) and `ckptport recalibrate`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import sha
import converter.model
from converter import bn
from converter.cli import main
from converter.errors import ConverterError, InvalidTensorError

MU = torch.tensor([2.0, -1.0, 0.5, 10.0])
SIGMA = torch.tensor([3.0, 0.5, 1.0, 2.0])


def population_batches(n: int, batch: int, seed: int = 0, spatial: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 3, 3) if spatial else (batch, 4)
    view = (1, 4, 1, 1) if spatial else (1, 4)
    return [torch.randn(*shape, generator=g) * SIGMA.view(view) + MU.view(view) for _ in range(n)]


def identity_bn1d(momentum: float | None = 0.1) -> nn.Sequential:
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    return nn.Sequential(lin, nn.BatchNorm1d(4, momentum=momentum))


def per_batch_stats(batches: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of per-batch means and of per-batch unbiased variances, by hand."""
    dims = [0, 2, 3] if batches[0].dim() == 4 else [0]
    means = torch.stack([b.double().mean(dims) for b in batches])
    varis = torch.stack([b.double().var(dims, unbiased=True) for b in batches])
    return means.mean(0), varis.mean(0)


def test_recalibrated_stats_match_population_better_than_ema() -> None:
    batches = population_batches(200, 16)
    model = identity_bn1d()
    model[1].running_mean.fill_(7.0)  # stale stats from somewhere else
    model[1].running_var.fill_(0.1)
    result = bn.recalibrate(model, batches, 200)
    assert result["num_batches"] == 200 and result["num_samples"] == 3200 and result["modules"] == ["1"]
    rm, rv = model[1].running_mean.double(), model[1].running_var.double()
    assert torch.allclose(rm, MU.double(), atol=0.15)
    assert torch.allclose(rv, SIGMA.double() ** 2, rtol=0.1)

    ema = identity_bn1d(momentum=0.1).train()
    with torch.no_grad():
        for b in batches:
            ema(b)
    err_mean = (rm - MU).abs().sum()
    err_var = ((rv - SIGMA ** 2) / SIGMA ** 2).abs().sum()
    ema_mean = (ema[1].running_mean - MU).abs().sum()
    ema_var = ((ema[1].running_var - SIGMA ** 2) / SIGMA ** 2).abs().sum()
    assert err_mean < ema_mean / 2 and err_var < ema_var / 2


@pytest.mark.parametrize("spatial", [False, True])
def test_recalibrated_stats_are_exactly_the_mean_of_batch_stats(spatial: bool) -> None:
    batches = population_batches(25, 8, seed=1, spatial=spatial)
    if spatial:
        conv = nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        model = nn.Sequential(conv, nn.BatchNorm2d(4))
    else:
        model = identity_bn1d()
    bn.recalibrate(model, batches, 25)
    mean, var = per_batch_stats(batches)
    assert torch.allclose(model[1].running_mean.double(), mean, atol=1e-5)
    assert torch.allclose(model[1].running_var.double(), var, rtol=1e-5)
    assert int(model[1].num_batches_tracked) == 25


def test_only_num_batches_are_used() -> None:
    batches = population_batches(30, 8, seed=2)
    model = identity_bn1d()
    bn.recalibrate(model, iter(batches), 10)
    mean, var = per_batch_stats(batches[:10])
    assert torch.allclose(model[1].running_mean.double(), mean, atol=1e-5)


def mixed_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4, momentum=0.01), nn.ReLU(),
        nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None)),
    )


def test_flags_momentum_and_other_params_restored() -> None:
    model = mixed_model().train()
    model[4].eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    bn.recalibrate(model, population_batches(5, 8), 5)
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert model[2].momentum == 0.01 and model[4][1].momentum is None
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_dropout_is_off_during_the_pass() -> None:
    """Dropout before BN would inflate the variance by 1/(1-p) if it ran in train mode."""
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(4))
    model = nn.Sequential(lin, nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    batches = population_batches(50, 32, seed=3)
    bn.recalibrate(model, batches, 50)
    _, var = per_batch_stats(batches)
    assert torch.allclose(model[2].running_var.double(), var, rtol=1e-5)


def test_data_runs_out_names_both_numbers_and_keeps_old_stats() -> None:
    model = identity_bn1d()
    model[1].running_mean.fill_(3.0)
    gen = (b for b in population_batches(3, 8))
    with pytest.raises(ConverterError, match=r"ran out after 3 batches; num_batches=5"):
        bn.recalibrate(model, gen, 5)
    assert torch.all(model[1].running_mean == 3.0) and model[1].momentum == 0.1
    with pytest.raises(ConverterError, match=r"holds 3 batches but num_batches=5"):
        bn.recalibrate(model, population_batches(3, 8), 5)  # a sized iterable fails before any work


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_num_batches_must_be_positive_int(n: object) -> None:
    with pytest.raises(ConverterError, match="positive integer"):
        bn.recalibrate(identity_bn1d(), population_batches(3, 8), n)  # type: ignore[arg-type]


def test_model_without_bn_is_an_error() -> None:
    with pytest.raises(ConverterError, match="no BatchNorm"):
        bn.recalibrate(nn.Linear(4, 4), population_batches(1, 4), 1)
    with pytest.raises(ConverterError, match="no BatchNorm"):
        bn.recalibrate(nn.BatchNorm1d(4, track_running_stats=False), population_batches(1, 4), 1)


def test_unreached_bn_keeps_its_stats() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.main = nn.BatchNorm1d(4)
            self.aux = nn.BatchNorm1d(4)  # used only in training, like Inception's aux head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.main(x)
            return self.aux(y) if self.training else y

    model = Branchy()
    model.aux.running_mean.fill_(5.0)
    model.aux.num_batches_tracked.fill_(7)
    result = bn.recalibrate(model, population_batches(4, 8), 4)
    assert result["modules"] == ["main"] and "not reached" in result["skipped"]["aux"]
    assert torch.all(model.aux.running_mean == 5.0) and int(model.aux.num_batches_tracked) == 7


def test_nan_data_raises_and_restores() -> None:
    model = identity_bn1d()
    model[1].running_var.fill_(2.0)
    batches = population_batches(3, 8)
    batches[1][0, 0] = float("nan")
    with pytest.raises(InvalidTensorError, match="module '1'.*NaN"):
        bn.recalibrate(model, batches, 3)
    assert torch.all(model[1].running_var == 2.0)


def test_forward_failure_is_a_clear_error_and_restores() -> None:
    model = identity_bn1d()
    model[1].running_mean.fill_(1.5)
    with pytest.raises(ConverterError, match=r"forward pass on batch 0 \(shape \(8, 5\)\) failed"):
        bn.recalibrate(model, [torch.zeros(8, 5)], 1)
    assert torch.all(model[1].running_mean == 1.5) and model[1].momentum == 0.1 and model.training


def test_tuple_dict_and_numpy_batches() -> None:
    batches = population_batches(4, 8)
    ref = identity_bn1d()
    bn.recalibrate(ref, batches, 4)
    for wrap in (lambda b: (b, torch.zeros(len(b))), lambda b: b.numpy()):
        m = identity_bn1d()
        bn.recalibrate(m, [wrap(b) for b in batches], 4)
        assert torch.allclose(m[1].running_mean, ref[1].running_mean)

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.bn(pixel_values)

    m = Kw()
    bn.recalibrate(m, [{"pixel_values": b} for b in batches], 4)
    assert torch.allclose(m.bn.running_mean, ref[1].running_mean)


def test_frozen_model_is_recalibrated_and_stays_frozen() -> None:
    model = bn.freeze(identity_bn1d())
    batches = population_batches(10, 8)
    bn.recalibrate(model, batches, 10)
    mean, _ = per_batch_stats(batches)
    assert torch.allclose(model[1].running_mean.double(), mean, atol=1e-5)
    assert bn.is_frozen(model[1])
    model.train()
    before = model[1].running_mean.clone()
    model(batches[0])
    assert torch.equal(model[1].running_mean, before)


DIST_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn
    from converter import bn

    def batches(rank):
        g = torch.Generator().manual_seed(100 + rank)
        return [torch.randn(8, 4, generator=g) * (rank + 1) + rank for _ in range(6)]

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    def worker(rank, init, out):
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
        m = model()
        res = bn.recalibrate(m, batches(rank), 6)
        if rank == 0:
            json.dump({"mean": m[1].running_mean.tolist(), "var": m[1].running_var.tolist(),
                       "nbt": int(m[1].num_batches_tracked), "world": res["world_size"]}, open(out, "w"))
        dist.destroy_process_group()

    if __name__ == "__main__":
        out, init = sys.argv[1], "file://" + sys.argv[2]
        mp.spawn(worker, args=(init, out), nprocs=2)
        m = model()
        bn.recalibrate(m, batches(0) + batches(1), 12)
        with open(out) as fh:
            got = json.load(fh)
        ok = (torch.allclose(torch.tensor(got["mean"]), m[1].running_mean, atol=1e-5)
              and torch.allclose(torch.tensor(got["var"]), m[1].running_var, rtol=1e-5)
              and got["nbt"] == 12 and got["world"] == 2)
        print("OK" if ok else f"MISMATCH {got} {m[1].running_mean} {m[1].running_var}")
""")


def test_distributed_stats_are_averaged_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks with different data give the stats of one process seeing all 12 batches."""
    script = tmp_path / "dist_recal.py"
    script.write_text(DIST_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out.json"), str(tmp_path / "rdzv")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "OK", proc.stdout


# ------------------------------------------------------------------ the CLI

NET = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=0.01))
"""


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint as `ckptport convert` writes one (target spec, bn_config metadata)."""
    from converter import formats

    (tmp_path / "net.py").write_text(NET)
    ns: dict = {}
    exec(NET, ns)
    torch.manual_seed(0)
    model = ns["make"]()
    path = tmp_path / "in.safetensors"
    cfg = {"2": {"eps": 1e-5, "momentum": 0.1}, "5": {"eps": 1e-3, "momentum": 0.01}}
    formats.write(path, model.state_dict(), {"target": f"{tmp_path / 'net.py'}:make", "target.kwargs": "{}",
                                             "surgeries": "[]", "bn_config": json.dumps(cfg)})
    return path


def data_array(n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).normal(1.0, 2.0, size=(n, 3, 6, 6)).astype(np.float32)


def test_cli_recalibrate_npy_matches_library(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = data_array()
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.safetensors"
    before = sha(ckpt)
    code = main(["recalibrate", str(ckpt), "--data", str(tmp_path / "x.npy"), "--num-batches", "4",
                 "--batch-size", "16", "--no-shuffle", "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == ["2", "5"] and report["num_samples"] == 64
    assert sha(ckpt) == before  # the input is never touched

    got = converter.model.load_model(out)
    ref = converter.model.load_model(ckpt)
    bn.recalibrate(ref, [torch.from_numpy(x[i * 16:(i + 1) * 16]) for i in range(4)], 4)
    for k in ("2.running_mean", "2.running_var", "5.running_mean", "5.running_var"):
        assert torch.allclose(got.state_dict()[k], ref.state_dict()[k], atol=1e-6), k
    assert got[5].momentum == 0.01 and got[5].eps == 1e-3 and not got.training
    meta = got.ckptport_metadata
    rec = json.loads(meta["recalibrated"])
    assert rec["num_batches"] == 4 and rec["batch_size"] == 16 and meta["target"].endswith("net.py:make")


def test_cli_recalibrate_npz_and_folder(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    x = data_array(40)
    np.savez(tmp_path / "d.npz", images=x, labels=np.zeros(40))
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, s in enumerate(x):
        np.save(folder / f"{i:03d}.npy", s)
    outs = []
    for data in (tmp_path / "d.npz", folder):
        out = tmp_path / f"out_{Path(data).stem}.safetensors"
        assert main(["recalibrate", str(ckpt), "--data", str(data), "--num-batches", "5", "--batch-size", "8",
                     "-o", str(out)]) == 0
        outs.append(converter.model.load_model(out).state_dict())
    cap = capsys.readouterr()
    assert "recalibrated 2 BN modules" in cap.out and "largest running-stat changes" in cap.err
    assert torch.allclose(outs[0]["2.running_var"], outs[1]["2.running_var"])  # same samples, same seed


def test_cli_recalibrate_errors(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    np.save(tmp_path / "x.npy", data_array(30))
    out = tmp_path / "out.safetensors"
    base = ["recalibrate", str(ckpt), "--data", str(tmp_path / "x.npy"), "--batch-size", "8", "-o"]
    assert main([*base, str(out), "--num-batches", "5"]) == 2
    err = capsys.readouterr().err
    assert "holds 30 samples = 3 full batches of 8, but --num-batches 5 needs 40 samples" in err
    assert not out.exists()

    # an existing -o without --force: tests/test_overwrite.py
    assert main([*base, str(ckpt), "--num-batches", "2", "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err

    np.save(tmp_path / "u8.npy", np.zeros((32, 3, 6, 6), np.uint8))
    assert main(["recalibrate", str(ckpt), "--data", str(tmp_path / "u8.npy"), "--batch-size", "8",
                 "--num-batches", "2", "-o", str(tmp_path / "o2.safetensors")]) == 2
    assert "uint8" in capsys.readouterr().err

    np.savez(tmp_path / "two.npz", a=data_array(8), b=data_array(8))
    assert main(["recalibrate", str(ckpt), "--data", str(tmp_path / "two.npz"), "--batch-size", "4",
                 "--num-batches", "2", "-o", str(tmp_path / "o3.safetensors")]) == 2
    assert "holds arrays a, b; name the input array with --key" in capsys.readouterr().err

    np.save(tmp_path / "bad.npy", np.zeros((32, 5, 6, 6), np.float32))
    assert main(["recalibrate", str(ckpt), "--data", str(tmp_path / "bad.npy"), "--batch-size", "8",
                 "--num-batches", "2", "-o", str(tmp_path / "o4.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "forward pass on batch 0" in err and "Traceback" not in err
    assert not (tmp_path / "o4.safetensors").exists()

    assert main(["recalibrate", str(ckpt), "--data", str(tmp_path / "x.npy"), "--batch-size", "8",
                 "--num-batches", "2", "-o", str(tmp_path / "o5.safetensors"), "--device", "nonsense"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
