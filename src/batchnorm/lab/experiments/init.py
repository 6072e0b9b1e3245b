"""Initialization: final held-out accuracy over a log grid of weight-initialization scales.

Weights start Gaussian with standard deviation ``scale / sqrt(fan_in)`` (scale 1 is LeCun's
initialization). BN's output does not change when the weights before it are scaled
(``BN(a W x) = BN(W x)`` for ``a > 0``), so the claim is that with BN the final accuracy barely
depends on the scale, while without it too small a scale stalls training and too large a one
saturates or explodes it. The measure: the spread (max - min) of final accuracy over the grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, sweep_point
from batchnorm.lab.models import bn_implementation

NAME = "init"
TITLE = "Insensitivity to weight initialization"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 1000  # SGD steps per scale
    batch_size: int = 60  # examples per step
    lr: float = 0.1  # SGD learning rate, the same for every run
    scales: tuple[float, ...] = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0)  # init std multipliers (log grid)
    hidden: tuple[int, ...] = (100, 100, 100)  # hidden widths
    activation: str = "relu"  # hidden nonlinearity
    eval_size: int = 2000  # held-out samples for the final accuracy
    seed: int = 0  # weights and batch order


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    accuracy = {
        norm: [
            sweep_point(
                config, bars, f"init {plots.label(norm)} {s:g}", norm=norm, lr=config.lr, init_scale=s
            )["final_accuracy"]
            for s in config.scales
        ]
        for norm in ("none", "bn")
    }
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "scales": list(config.scales),
        "final_accuracy": accuracy,
        "spread": {norm: max(acc) - min(acc) for norm, acc in accuracy.items()},
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    fig, (ax,) = plots.figure(
        f"{TITLE} ({results['data']['name']}, {results['config']['steps']} steps, "
        f"lr {results['config']['lr']})",
        [("final held-out accuracy vs init scale", "init scale: std x sqrt(fan_in) (log scale)", "accuracy")],
        width=6.0,
    )
    for norm, acc in results["final_accuracy"].items():
        ax.plot(results["scales"], acc, marker="o", color=plots.COLORS[norm], label=plots.label(norm))
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    return [plots.save(fig, Path(out_dir) / "init.png")]


def claims(results: dict) -> list[dict]:
    spread = results["spread"]
    return [
        claim(
            NAME,
            "accuracy depends less on the init scale with BN",
            f"accuracy spread over scales {spread['bn']:.1%} with BN vs {spread['none']:.1%} without",
            spread["bn"] < spread["none"],
        )
    ]
