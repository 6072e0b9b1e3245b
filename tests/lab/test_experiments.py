"""Each experiment in a tiny configuration: its JSON fields, values and PNG files."""

from __future__ import annotations

import importlib
import json

import pytest

from batchnorm.lab.experiments import EXPERIMENTS
from batchnorm.lab.runner import run_experiments

# experiment -> tiny overrides, and the result fields that must be there
TINY = {
    "fig1": ({"steps": 40, "eval_every": 10}, ["runs"]),
    "lr": ({"steps": 15, "lrs": (0.1, 100.0)}, ["lrs", "final_accuracy", "usable_lrs"]),
    "init": ({"steps": 15, "scales": (0.1, 1.0)}, ["scales", "final_accuracy", "spread"]),
    "batch-size": (
        {"steps": 10, "batch_sizes": (2, 32)},
        ["batch_sizes", "final_accuracy", "train_accuracy"],
    ),
    "distributions": ({"steps": 10, "probe_size": 200}, ["layers"]),
    "train-eval": ({"steps": 30, "recalibration_batches": 5}, ["clean", "shifted"]),
    "cnn": ({"steps": 10, "eval_every": 5, "width": 4}, ["runs"]),
}
PNGS = {
    "distributions": ["distributions_mlp.png", "distributions_cnn.png"],
    "batch-size": ["batch_size.png"],
    "train-eval": ["train_eval.png"],
}


def _accuracies(value, inside: bool = False):
    """Every number under a key naming an accuracy, however deeply nested."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _accuracies(v, inside or "accuracy" in k or k in ("clean", "shifted"))
    elif isinstance(value, list):
        for v in value:
            yield from _accuracies(v, inside)
    elif inside and isinstance(value, float):
        yield value


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_experiment_tiny(name, tmp_path):
    overrides, fields = TINY[name]
    module = importlib.import_module(EXPERIMENTS[name])
    config = module.Config(**overrides)
    claims = run_experiments([(EXPERIMENTS[name], config)], tmp_path, title="t", progress=False)
    doc = json.loads((tmp_path / "results.json").read_text())
    results = doc["experiments"][module.NAME]
    assert results["config"]["steps"] == overrides["steps"]  # the effective configuration is saved
    assert results["bn_implementation"] in ("batchnorm.nn", "torch.nn")
    for field in fields:
        assert field in results
    accs = list(_accuracies(results))
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert accs or name == "distributions"  # the one experiment that measures no accuracy
    assert claims and all(set(c) == {"experiment", "claim", "measured", "held"} for c in claims)
    assert doc["claims"] == claims
    for png in PNGS.get(name, [f"{name}.png"]):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(PNGS.get(name, [name]))


def test_fig1_histories_match_steps(tmp_path):
    from batchnorm.lab.experiments import fig1

    results = fig1.run(fig1.Config(steps=30, eval_every=10, probe_size=100))
    for run in results["runs"].values():
        assert run["steps"] == [0, 10, 20, 30]
        assert len(run["train_loss"]) == 30
        assert len(run["percentiles"]) == 3 and all(p15 <= p50 <= p85 for p15, p50, p85 in run["percentiles"])
    assert results["config"]["target"] == fig1.TARGETS["mnist1d"]


def test_lr_sweep_flags_divergence():
    from batchnorm.lab.experiments import lr

    results = lr.run(lr.Config(steps=20, lrs=(1e4,)))
    assert results["diverged_at"]["none"][0] is not None
    assert results["final_accuracy"]["none"][0] == pytest.approx(0.1)


def test_distributions_per_feature_statistics():
    from batchnorm.lab.experiments import distributions

    results = distributions.run(distributions.Config(steps=5, probe_size=100, width=4))
    mlp, cnn = results["layers"]["mlp"], results["layers"]["cnn"]
    assert len(mlp["before_mean"]) == len(mlp["gamma"]) == 100
    assert len(cnn["after_std"]) == len(cnn["beta"]) == 8  # deepest block: 2 x width channels
    assert all(s >= 0 for s in mlp["before_std"] + mlp["after_std"])
