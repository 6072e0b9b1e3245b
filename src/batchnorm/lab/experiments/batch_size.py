"""Batch size: held-out accuracy from batches of 2 to 256, for BN and its alternatives.

BN estimates its statistics from the mini-batch. With very small batches those estimates are
noisy and differ from the running averages used at prediction time, so BN fails there, while a
batch-independent norm (GroupNorm) does not; Ghost BN (statistics over virtual sub-batches) and
Batch Renormalization (Ioffe, 2017: corrects the batch statistics towards the running ones) are
the project's remedies. The same noise regularizes: the train / held-out gap is reported too.
Every run takes the same number of steps and learning rate, so larger batches see more data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, sweep_point
from batchnorm.lab.models import bn_implementation

NAME = "batch-size"
TITLE = "Batch size: BN's small-batch failure and its remedies"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 600  # SGD steps per run, whatever the batch size
    batch_size: int = 60  # unused here (the grid below replaces it); kept for the shared helpers
    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128, 256)  # the grid
    norms: tuple[str, ...] = ("bn", "none", "group", "ghost", "renorm")  # unavailable ones are skipped
    # Ghost BN's virtual batch; Batch Renorm's steps as plain BN before its correction starts
    norm_options: dict = field(default_factory=lambda: {"virtual_batch_size": 16, "renorm_warmup": 100})
    lr: float = 0.05  # SGD learning rate, the same for every run
    hidden: tuple[int, ...] = (100, 100, 100)  # hidden widths
    activation: str = "relu"  # hidden nonlinearity
    eval_size: int = 2000  # held-out (and training) samples for the accuracies
    seed: int = 0  # weights and batch order


def _available(norm: str) -> bool:
    if norm not in ("ghost", "renorm"):
        return True
    try:
        from batchnorm import nn as bnn

        getattr(bnn, "GhostBatchNorm1d" if norm == "ghost" else "BatchRenorm1d")
    except (ImportError, AttributeError):
        return False
    return True


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    norms = [n for n in config.norms if _available(n)]
    points = {
        norm: [
            sweep_point(config, bars, f"batch {plots.label(norm)} {b}", norm=norm, lr=config.lr, batch_size=b)
            for b in config.batch_sizes
        ]
        for norm in norms
    }
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "batch_sizes": list(config.batch_sizes),
        "skipped": [n for n in config.norms if n not in norms],
        "final_accuracy": {n: [p["final_accuracy"] for p in ps] for n, ps in points.items()},
        "train_accuracy": {n: [p["train_accuracy"] for p in ps] for n, ps in points.items()},
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    fig, (ax_acc, ax_gap) = plots.figure(
        f"{TITLE} ({results['data']['name']}, {results['config']['steps']} steps each)",
        [
            ("held-out accuracy", "batch size (log scale)", "accuracy"),
            ("generalization gap", "batch size (log scale)", "train - held-out accuracy"),
        ],
    )
    b = results["batch_sizes"]
    for norm, acc in results["final_accuracy"].items():
        gap = [t - a for t, a in zip(results["train_accuracy"][norm], acc, strict=True)]
        ax_acc.plot(b, acc, marker="o", color=plots.COLORS[norm], label=plots.label(norm))
        ax_gap.plot(b, gap, marker="o", color=plots.COLORS[norm], label=plots.label(norm))
    for ax in (ax_acc, ax_gap):
        ax.set_xscale("log", base=2)
    ax_acc.set_ylim(0, 1)
    return [plots.save(fig, Path(out_dir) / "batch_size.png")]


def claims(results: dict) -> list[dict]:
    acc, b = results["final_accuracy"], results["batch_sizes"]
    smallest, bn_best = b[0], max(acc["bn"])
    rows = []
    if "group" in acc:
        rows.append(
            claim(
                NAME,
                f"BN breaks down at batch {smallest}, a batch-independent norm does not",
                f"batch {smallest}: BN {acc['bn'][0]:.1%}, GroupNorm {acc['group'][0]:.1%}; "
                f"BN's best {bn_best:.1%}",
                acc["bn"][0] < acc["group"][0] and acc["bn"][0] < bn_best - 0.05,
            )
        )
    gap = {
        n: [t - a for t, a in zip(results["train_accuracy"][n], acc[n], strict=True)] for n in ("bn", "none")
    }
    i = min(range(len(b)), key=lambda k: abs(b[k] - 32))
    rows.append(
        claim(
            NAME,
            f"BN's batch noise regularizes (smaller train/held-out gap at batch {b[i]})",
            f"gap {gap['bn'][i]:+.1%} with BN vs {gap['none'][i]:+.1%} without",
            gap["bn"][i] < gap["none"][i],
        )
    )
    return rows
