"""converter.bn.audit, resolve_model_spec, audit_target and `ckptport audit`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from converter import bn
from converter.cli import main
from converter.errors import ConverterError, SourceFormatError


def rules_of(findings: list[bn.Finding]) -> set[str]:
    return {f.rule for f in findings}


def net(**bn_kwargs: object) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, **bn_kwargs), nn.ReLU()).eval()


def loaded(model: nn.Module, mean: float = 0.5, var: float = 2.0) -> nn.Module:
    """Running stats as a converted checkpoint would hold them (not at init)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.fill_(mean)
            m.running_var.fill_(var)
    return model


# ------------------------------------------------------------------ rules


def test_rules_registered_with_valid_severities() -> None:
    ids = list(bn.RULES)
    assert {"momentum-keras-convention", "momentum-cumulative", "eps-mismatch", "no-running-stats",
            "affine-missing", "running-var-nonpositive", "running-stats-nonfinite", "train-mode",
            "nbt-stats-never-updated", "nbt-zero-cumulative", "momentum-out-of-range"} == set(ids)
    assert all(bn.RULES.get(r).severity in bn.SEVERITIES for r in ids)
    with pytest.raises(ConverterError, match="valid:"):
        bn.audit(net(), rules=["no-such-rule"])


def test_keras_momentum_is_an_error_with_fix() -> None:
    (f,) = bn.audit(net(momentum=0.99))
    assert (f.rule, f.severity, f.module) == ("momentum-keras-convention", "error", "1")
    assert "momentum=0.01" in f.fix and "0.99" in f.message
    assert set(f.to_dict()) == {"rule", "severity", "module", "message", "fix"}


@pytest.mark.parametrize("momentum,flagged", [(0.5, False), (0.51, True), (1.0, True), (0.1, False), (0.0003, False)])
def test_momentum_threshold(momentum: float, flagged: bool) -> None:
    assert ("momentum-keras-convention" in rules_of(bn.audit(net(momentum=momentum)))) is flagged


@pytest.mark.parametrize("momentum", [1.5, -0.1])
def test_momentum_out_of_range(momentum: float) -> None:
    m = net()
    m[1].momentum = momentum
    assert rules_of(bn.audit(m)) == {"momentum-out-of-range"}


def test_momentum_none_is_info() -> None:
    (f,) = bn.audit(net(momentum=None))
    assert (f.rule, f.severity) == ("momentum-cumulative", "info")


def test_eps_mismatch_needs_source_and_compares() -> None:
    m = net()  # eps 1e-5
    assert bn.audit(m) == []
    assert bn.audit(m, {"1": {"eps": 1e-5}}) == []
    (f,) = bn.audit(m, {"1": {"eps": 1.001e-5}})  # Keras ResNet's eps: close, still a mismatch
    assert (f.rule, f.severity) == ("eps-mismatch", "warning") and "1.001e-05" in f.fix
    assert rules_of(bn.audit(m, {"1": {"eps": 1e-3}})) == {"eps-mismatch"}
    assert bn.audit(m, {"other": {"eps": 1e-3}}) == []


def test_track_running_stats_false_both_ways() -> None:
    (f,) = bn.audit(net(track_running_stats=False))
    assert (f.rule, f.severity) == ("no-running-stats", "warning") and "own statistics" in f.message
    m = net()
    m[1].track_running_stats = False  # toggled after construction: buffers remain, never updated
    (f,) = bn.audit(m)
    assert f.rule == "no-running-stats" and "never update" in f.message


def test_affine_missing_only_when_source_had_scale_or_center() -> None:
    m = net(affine=False)
    assert bn.audit(m) == []
    assert bn.audit(m, {"1": {"scale": False, "center": False}}) == []
    (f,) = bn.audit(m, {"1": {"scale": True, "center": False}})
    assert (f.rule, f.severity) == ("affine-missing", "warning") and "scale=True" in f.message
    assert rules_of(bn.audit(m, {"1": {"center": True}})) == {"affine-missing"}


def test_running_var_nonpositive_and_nonfinite_are_errors() -> None:
    m = loaded(net())
    m[1].running_var[0] = -1.0
    m[1].running_var[1] = 0.0
    (f,) = bn.audit(m)
    assert (f.rule, f.severity) == ("running-var-nonpositive", "error") and "2 of 4" in f.message
    m = loaded(net())
    m[1].running_mean[2] = float("nan")
    m[1].running_var[3] = float("inf")
    (f,) = bn.audit(m)
    assert (f.rule, f.severity) == ("running-stats-nonfinite", "error")
    assert "running_mean has 1" in f.message and "running_var has 1" in f.message


def test_train_mode_flagged_only_when_inference_is_expected() -> None:
    m = net().train()
    (f,) = bn.audit(m)
    assert (f.rule, f.severity, f.module) == ("train-mode", "warning", "1")
    assert bn.audit(m, expect_eval=False) == []
    bn.freeze(m)
    m.train()
    assert bn.audit(m) == []  # a frozen BN runs in eval whatever its flag says


def test_num_batches_tracked_counted_but_never_updated() -> None:
    m = net()
    m[1].num_batches_tracked.fill_(100)  # stats still 0 / 1
    (f,) = bn.audit(m)
    assert (f.rule, f.severity) == ("nbt-stats-never-updated", "warning")


def test_num_batches_tracked_zero_with_cumulative_momentum() -> None:
    m = loaded(net(momentum=None))
    assert rules_of(bn.audit(m)) == {"momentum-cumulative", "nbt-zero-cumulative"}
    m[1].num_batches_tracked.fill_(50)
    assert rules_of(bn.audit(m)) == {"momentum-cumulative"}


def test_converter_convention_nbt_zero_with_momentum_is_clean() -> None:
    """We write num_batches_tracked = 0 with a real momentum: must not be flagged."""
    m = loaded(net(momentum=0.01, eps=1e-3))
    assert int(m[1].num_batches_tracked) == 0
    assert bn.audit(m, {"1": {"eps": 1e-3, "scale": True, "center": True}}) == []


def test_subclasses_and_frozen_bn_are_checked() -> None:
    from timm.layers import BatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = nn.ModuleDict({
        "sync": nn.SyncBatchNorm(4, momentum=0.99),
        "act": BatchNormAct2d(4, momentum=0.99),
        "frozen": FrozenBatchNorm2d(4),
        "lazy": nn.LazyBatchNorm2d(),
        "inorm": nn.InstanceNorm2d(4),
    }).eval()
    model["frozen"].running_var[0] = float("nan")
    found = {(f.module, f.rule) for f in bn.audit(model)}
    assert found == {("sync", "momentum-keras-convention"), ("act", "momentum-keras-convention"),
                     ("frozen", "running-stats-nonfinite")}
    assert [n for n, _ in bn.bn_modules(model)] == ["sync", "act", "frozen", "lazy"]


def test_audit_leaves_the_model_alone() -> None:
    m = loaded(net(momentum=0.99)).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    bn.audit(m)
    assert m.training and m[1].training and m[1].momentum == 0.99
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_meta_device_models_skip_value_rules() -> None:
    with torch.device("meta"):
        m = net(momentum=0.99)
    assert rules_of(bn.audit(m)) == {"momentum-keras-convention"}


def test_severity_order() -> None:
    assert bn.severity_at_least("error", "warning") and not bn.severity_at_least("info", "warning")
    with pytest.raises(ConverterError):
        bn.severity_at_least("fatal", "info")


# ------------------------------------------------------------------ model specs


def write_factory(tmp_path: Path, body: str, name: str = "mynet.py") -> Path:
    p = tmp_path / name
    p.write_text("import torch.nn as nn\n" + textwrap.dedent(body))
    return p


def test_spec_torchvision_and_timm_build_in_eval() -> None:
    m = bn.resolve_model_spec("torchvision:resnet18")
    assert type(m).__name__ == "ResNet" and not m.training
    m = bn.resolve_model_spec("timm:resnet18")
    assert not m.training and m.default_cfg["architecture"] == "resnet18"


def test_spec_unknown_names_list_close_ones() -> None:
    with pytest.raises(ConverterError, match=r"torchvision has no model 'resnet19'.*close: .*resnet18"):
        bn.resolve_model_spec("torchvision:resnet19")
    with pytest.raises(ConverterError, match=r"timm has no model 'resnet5'.*close: .*resnet50"):
        bn.resolve_model_spec("timm:resnet5")
    with pytest.raises(ConverterError, match=r"torchvision:NAME.*timm:NAME.*file\.py:factory"):
        bn.resolve_model_spec("keras:ResNet50")


def test_spec_detection_model_needs_no_download() -> None:
    """torchvision detection builders default to a pretrained backbone; we pass weights_backbone=None."""
    m = bn.resolve_model_spec("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")
    assert not m.training


def test_spec_from_file(tmp_path: Path) -> None:
    p = write_factory(tmp_path, """
        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        def broken():
            raise RuntimeError("boom")
        def not_a_module():
            return 42
    """)
    m = bn.resolve_model_spec(f"{p}:make")
    assert isinstance(m[1], nn.BatchNorm2d) and not m.training
    with pytest.raises(ConverterError, match=r"has no function 'nope'; functions there: broken, make, not_a_module"):
        bn.resolve_model_spec(f"{p}:nope")
    with pytest.raises(ConverterError, match=r"broken\(\) raised RuntimeError: boom"):
        bn.resolve_model_spec(f"{p}:broken")
    with pytest.raises(ConverterError, match="returned int, not a torch.nn.Module"):
        bn.resolve_model_spec(f"{p}:not_a_module")
    with pytest.raises(ConverterError, match="does not exist"):
        bn.resolve_model_spec(f"{tmp_path / 'missing.py'}:make")
    bad = write_factory(tmp_path, "def make(:\n", name="bad.py")
    with pytest.raises(ConverterError, match="importing .*bad.py failed: SyntaxError"):
        bn.resolve_model_spec(f"{bad}:make")


# ------------------------------------------------------------------ the zoo


def test_maxvit_t_not_flagged_for_momentum() -> None:
    """torchvision shipped momentum 0.99 in MaxViT until vision #8250; the fixed 0.01 must pass."""
    m = bn.resolve_model_spec("torchvision:maxvit_t")
    moms = {x.momentum for x in m.modules() if isinstance(x, nn.BatchNorm2d)}
    assert moms == {0.01}
    assert bn.audit(m) == []


ZOO_SAMPLE = [
    "torchvision:resnet18", "torchvision:mnasnet0_5", "torchvision:mobilenet_v3_small",
    "torchvision:efficientnet_b0", "timm:resnet18", "timm:tf_mobilenetv3_small_100", "timm:efficientnet_b0",
]


@pytest.mark.parametrize("spec", ZOO_SAMPLE)
def test_zoo_sample_is_clean(spec: str) -> None:
    report = bn.audit_target(spec)
    assert report.modules_checked > 0 and report.findings == [], report.findings


def test_zoo_unusual_but_correct_configs_pass() -> None:
    """mnasnet's momentum 1 - 0.9997 and timm tf_* eps 1e-3 are deliberate: not findings."""
    m = bn.resolve_model_spec("torchvision:mnasnet0_5")
    assert {round(x.momentum, 6) for x in m.modules() if isinstance(x, nn.BatchNorm2d)} == {0.0003}
    t = bn.resolve_model_spec("timm:tf_mobilenetv3_small_100")
    assert {(x.momentum, x.eps) for x in t.modules() if isinstance(x, nn.BatchNorm2d)} == {(0.1, 1e-3)}


@pytest.mark.slow
def test_zoo_sweep_torchvision_classification_and_timm_sample() -> None:
    import timm
    import torchvision

    specs = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    specs += [f"timm:{n}" for n in timm.list_models()[::25]]
    flagged = {}
    for spec in specs:
        with torch.device("meta"):
            try:
                model = bn.resolve_model_spec(spec)
            except ConverterError:
                model = None
        if model is None:
            model = bn.resolve_model_spec(spec)
        found = bn.audit(model)
        if found:
            flagged[spec] = sorted(rules_of(found))
    assert flagged == {}


# ------------------------------------------------------------------ audit_target and the CLI


def test_cli_keras_momentum_exits_1_with_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = write_factory(tmp_path, """
        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.99),
                                 nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, momentum=0.99))
    """)
    target = f"{p}:make"
    assert main(["audit", target, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == target and out["modules_checked"] == 2
    assert [(f["rule"], f["severity"], f["module"]) for f in out["findings"]] == [
        ("momentum-keras-convention", "error", "1"), ("momentum-keras-convention", "error", "3")]
    assert set(out["findings"][0]) == {"rule", "severity", "module", "message", "fix"}


def test_cli_table_on_stderr_summary_on_stdout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = write_factory(tmp_path, """
        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.99))
    """)
    assert main(["audit", f"{p}:make"]) == 1
    cap = capsys.readouterr()
    assert "momentum-keras-convention" in cap.err and "fix:" in cap.err
    assert cap.out.count("\n") == 1 and "1 BN modules checked, 1 error: FAIL (--fail-on warning)" in cap.out


@pytest.mark.parametrize("fail_on,code", [("info", 1), ("warning", 0), ("error", 0)])
def test_cli_fail_on_threshold(tmp_path: Path, capsys: pytest.CaptureFixture, fail_on: str, code: int) -> None:
    p = write_factory(tmp_path, """
        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None))
    """)
    assert main(["audit", f"{p}:make", "--fail-on", fail_on]) == code
    assert "1 info" in capsys.readouterr().out


def test_cli_clean_maxvit_exits_0(capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "torchvision:maxvit_t", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"findings": [], "target": "torchvision:maxvit_t", "modules_checked": 34}


@pytest.mark.parametrize("target,msg", [
    ("timm:resnet5", "close: resnet50"),
    ("whatever", "give a model spec"),
    ("missing.safetensors", "no such file"),
])
def test_cli_could_not_run_exits_2(capsys: pytest.CaptureFixture, target: str, msg: str) -> None:
    assert main(["audit", target]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and msg in err and "Traceback" not in err


def test_cli_bad_fail_on_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", "torchvision:resnet18", "--fail-on", "fatal"]) == 2


def test_source_bn_from_metadata() -> None:
    assert bn.source_bn_from_metadata({}) == {}
    assert bn.source_bn_from_metadata({"bn_config": '{"bn1": {"eps": 0.001}}'}) == {"bn1": {"eps": 0.001}}
    with pytest.raises(SourceFormatError, match="not valid JSON"):
        bn.source_bn_from_metadata({"bn_config": "{"}, "x.safetensors")
    with pytest.raises(SourceFormatError, match="mapping"):
        bn.source_bn_from_metadata({"bn_config": "[1]"}, "x.safetensors")


def write_ours(tmp_path: Path, factory_body: str, state: dict[str, torch.Tensor], bn_config: dict) -> Path:
    """A checkpoint as `ckptport convert` writes one: tensors + target spec + bn_config metadata."""
    from converter import formats

    p = write_factory(tmp_path, factory_body, name="ckpt_net.py")
    out = tmp_path / "model.safetensors"
    formats.write(out, state, {"target": f"{p}:make", "target.kwargs": "{}", "surgeries": "[]",
                               "bn_config": json.dumps(bn_config)})
    return out


FACTORY = """
    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
"""


def test_cli_audits_our_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))
    loaded(model)
    model[1].running_var[0] = -0.5
    cfg = {"1": {"eps": 1e-3, "momentum": 0.01, "keras_momentum": 0.99, "center": True, "scale": True}}
    path = write_ours(tmp_path, FACTORY, model.state_dict(), cfg)
    report = bn.audit_target(str(path))
    assert report.kind == "checkpoint" and report.modules_checked == 1
    assert rules_of(report.findings) == {"running-var-nonpositive", "affine-missing"}
    assert main(["audit", str(path), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {f["rule"] for f in out["findings"]} == {"running-var-nonpositive", "affine-missing"}


def test_cli_audits_clean_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    body = """
        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    """
    model = loaded(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    cfg = {"1": {"eps": 1e-3, "momentum": 0.01, "center": True, "scale": True}}
    path = write_ours(tmp_path, body, model.state_dict(), cfg)
    assert main(["audit", str(path)]) == 0
    assert "clean: ok" in capsys.readouterr().out


def test_checkpoint_not_ours_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from converter import formats

    p = tmp_path / "plain.safetensors"
    formats.write(p, {"w": torch.zeros(2)}, {})
    assert main(["audit", str(p)]) == 2
    assert "error:" in capsys.readouterr().err
