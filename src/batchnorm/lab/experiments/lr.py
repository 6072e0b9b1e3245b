"""Learning-rate tolerance: final held-out accuracy over a log grid of SGD learning rates.

The claim (Ioffe & Szegedy, section 3.3): BN makes training robust to the scale of the
parameters, so much higher learning rates still train instead of diverging or stalling.
A learning rate counts as "usable" when its final accuracy is at least ``usable_fraction`` of the
best accuracy either network reached anywhere on the grid (it neither diverged nor stalled).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, sweep_point
from batchnorm.lab.models import bn_implementation

NAME = "lr"
TITLE = "Learning-rate tolerance"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 1000  # SGD steps per learning rate
    batch_size: int = 60  # examples per step
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # the log grid
    hidden: tuple[int, ...] = (100, 100, 100)  # hidden widths
    activation: str = "relu"  # hidden nonlinearity (ReLU nets diverge visibly at high rates)
    usable_fraction: float = 0.5  # "usable": final accuracy >= this fraction of the grid's best
    eval_size: int = 2000  # held-out samples for the final accuracy
    seed: int = 0  # weights and batch order


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    curves = {
        norm: [
            sweep_point(config, bars, f"lr {plots.label(norm)} {lr:g}", norm=norm, lr=lr) for lr in config.lrs
        ]
        for norm in ("none", "bn")
    }
    accuracy = {norm: [p["final_accuracy"] for p in points] for norm, points in curves.items()}
    best = max(max(a) for a in accuracy.values())
    usable = {
        norm: [lr for lr, a in zip(config.lrs, acc, strict=True) if a >= config.usable_fraction * best]
        for norm, acc in accuracy.items()
    }
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "lrs": list(config.lrs),
        "final_accuracy": accuracy,
        "diverged_at": {norm: [p["diverged_at"] for p in points] for norm, points in curves.items()},
        "best_accuracy": best,
        "usable_lrs": usable,
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    fig, (ax,) = plots.figure(
        f"{TITLE} ({results['data']['name']}, {results['config']['steps']} steps each)",
        [("final held-out accuracy vs learning rate", "learning rate (log scale)", "accuracy")],
        width=6.0,
    )
    for norm, acc in results["final_accuracy"].items():
        ax.plot(results["lrs"], acc, marker="o", color=plots.COLORS[norm], label=plots.label(norm))
    fraction = results["config"]["usable_fraction"]
    ax.axhline(
        fraction * results["best_accuracy"],
        color="black",
        linestyle=":",
        linewidth=1,
        label=f"usable: {fraction:.0%} of best",
    )
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    return [plots.save(fig, Path(out_dir) / "lr.png")]


def claims(results: dict) -> list[dict]:
    usable = results["usable_lrs"]
    top = {norm: max(lrs) if lrs else None for norm, lrs in usable.items()}

    def fmt(norm: str) -> str:
        lrs = usable[norm]
        return f"{min(lrs):g}-{max(lrs):g} ({len(lrs)} of {len(results['lrs'])})" if lrs else "none"

    held = top["bn"] is not None and (
        top["none"] is None or (top["bn"] > top["none"] and len(usable["bn"]) >= len(usable["none"]))
    )
    return [
        claim(
            NAME,
            "BN trains well at higher learning rates",
            f"usable learning rates with BN {fmt('bn')}, without {fmt('none')}",
            held,
        )
    ]
