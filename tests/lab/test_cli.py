"""``batchnorm demo`` end to end with a reduced budget, and ``batchnorm lab`` on MNIST."""

from __future__ import annotations

import json

import pytest

from batchnorm.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--budget", "0.02", "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["experiments"]) == {"fig1", "lr", "distributions"}
    assert doc["experiments"]["fig1"]["config"]["steps"] == 90  # 2% of the demo's 4500
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["distributions_cnn.png", "distributions_mlp.png", "fig1.png", "lr.png"]
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "<img" in html and "src='fig1.png'" not in html
    printed = capsys.readouterr().out
    assert "What batch normalization did in this run" in printed
    assert len(doc["claims"]) >= 4


def test_lab_fig1_on_mnist(mnist_dir, tmp_path):
    out = tmp_path / "fig1"
    argv = [
        "lab",
        "fig1",
        "--dataset",
        "mnist",
        "--data-dir",
        str(mnist_dir),
        "--steps",
        "20",
        "--seed",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())["experiments"]["fig1"]
    assert results["data"] == {
        "name": "mnist",
        "train": 8000,
        "test": 2000,
        "sample_shape": [1, 28, 28],
        "num_classes": 10,
    }
    assert results["config"]["seed"] == 3 and results["config"]["target"] == 0.9
    assert results["runs"]["bn"]["steps"][-1] == 20
    assert (out / "fig1.png").is_file()


def test_lab_rejects_unknown_experiment(capsys):
    with pytest.raises(SystemExit):
        main(["lab", "nope"])
    assert "invalid choice" in capsys.readouterr().err
