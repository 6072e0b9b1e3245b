"""diagnose: a layer with stale running statistics is flagged, a healthy one is not; CLI."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from rich.console import Console
from torch import nn

import batchnorm
import batchnorm.nn as bnn
from batchnorm.cli import main
from batchnorm.tools.diagnose import Thresholds, diagnose
from batchnorm.tools.recalibrate import recalibrate


def make(bn2d: type[nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), bn2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1), bn2d(6), nn.Flatten())


def batches(count: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(16, 3, 6, 6, generator=g) for _ in range(count)]


@pytest.mark.parametrize("bn2d", [nn.BatchNorm2d, bnn.BatchNorm2d], ids=["torch", "batchnorm"])
def test_stale_layer_flagged_healthy_layer_not(bn2d):
    model = make(bn2d).eval()
    data = batches()
    recalibrate(model, data)
    healthy = diagnose(model, data)
    assert [layer.verdict for layer in healthy.layers] == ["ok", "ok"] and healthy.stale == []
    assert "nothing to do" in healthy.suggestion

    # Layer 4's statistics were taken before the conv feeding it moved (its bias shifted by 2):
    # they describe inputs shifted by 2, about 3 standard deviations.
    stale_source = make(bn2d)
    with torch.no_grad():
        stale_source[3].bias.add_(2.0)
    recalibrate(stale_source, data)
    model[4].load_state_dict(stale_source[4].state_dict())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = diagnose(model, data, num_batches=4)
    assert report.num_batches == 4
    assert [layer.verdict for layer in report.layers] == ["ok", "stale"]
    assert report.stale == ["4"] and "recalibrate" in report.suggestion
    assert report.layers[1].output_gap > report.layers[0].output_gap
    assert report.model_output_gap > healthy.model_output_gap
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # nothing changed
    assert not model.training and not any(m.training for m in model.modules())

    recalibrate(model, data)
    assert diagnose(model, data).stale == []


def test_mean_distance_and_variance_ratio_are_the_formulas():
    bn = nn.BatchNorm2d(2, eps=1e-5).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 0.0]))
        bn.running_var.copy_(torch.tensor([4.0, 1.0]))
    x = torch.randn(64, 2, 8, 8, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    layer = diagnose(bn, [x]).layers[0]
    flat = x.double().transpose(0, 1).reshape(2, -1)
    distance = (flat.mean(dim=1) - torch.tensor([1.0, 0.0])).abs() / torch.sqrt(
        torch.tensor([4.0, 1.0]) + 1e-5
    )
    ratio = flat.var(dim=1, unbiased=False) / torch.tensor([4.0, 1.0])
    assert layer.mean_distance_max == pytest.approx(float(distance.max()), rel=1e-6)
    assert layer.var_ratio_min == pytest.approx(float(ratio.min()), rel=1e-6)
    assert layer.verdict == "stale"  # channel 0: mean 0 vs running 1, var 1 vs running 4


def test_constant_dead_and_extreme_channels():
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.0, 1.0, 50.0]))
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0.0
    layer = diagnose(bn, [x]).layers[0]
    assert (
        layer.constant_channels == [2] and layer.dead_channels == [1] and layer.extreme_gamma_channels == [3]
    )
    assert any("constant" in r for r in layer.reasons)


def test_untracked_and_frozen_layers():
    model = nn.Sequential(bnn.FrozenBatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    report = diagnose(model, [torch.randn(8, 3) * 5 + 3])
    assert report.layers[0].verdict == "stale" and report.layers[1].verdict == "skipped"


def test_json_and_table():
    model = make().eval()
    report = diagnose(model, batches(), thresholds=Thresholds(mean_distance_stale=0.01))
    data = json.loads(report.to_json())
    assert data["num_batches"] == 8 and [layer["name"] for layer in data["layers"]] == ["1", "4"]
    assert data["thresholds"]["mean_distance_stale"] == 0.01
    console = Console(record=True, width=140)
    report.print(console)
    text = console.export_text()
    assert "BN diagnosis" in text and "BatchNorm2d" in text and "recalibrate" in text


def test_errors():
    with pytest.raises(ValueError, match="no batch"):
        diagnose(make(), [])
    with pytest.raises(ValueError, match="num_batches"):
        diagnose(make(), batches(), num_batches=0)
    assert batchnorm.diagnose is diagnose


@pytest.fixture
def model_module(tmp_path, monkeypatch):
    """An importable module with a model factory whose second BN is stale on standard normal data."""
    (tmp_path / "diag_models.py").write_text(
        textwrap.dedent("""
        import torch
        from torch import nn

        def stale():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Linear(4, 4))
            with torch.no_grad():
                model[1].running_mean.fill_(5.0)
            return model.eval()
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_cli(model_module, capsys):
    assert (
        main(["diagnose", "diag_models:stale", "--synthetic", "3,6,6", "--num-batches", "2", "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["stale"] == ["1"] and data["num_batches"] == 2

    torch.save(torch.randn(20, 3, 6, 6), model_module / "x.pt")
    code = main(
        [
            "diagnose",
            "diag_models:stale",
            "--data",
            str(model_module / "x.pt"),
            "--batch-size",
            "8",
            "--strict",
        ]
    )
    assert code == 1 and "stale" in capsys.readouterr().out

    assert main(["diagnose", "diag_models:missing", "--synthetic", "3,6,6"]) == 2
    assert "missing" in capsys.readouterr().err
