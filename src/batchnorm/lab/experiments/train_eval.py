"""Train vs eval: batch statistics, running statistics, and stale running statistics.

A BN network predicts with its running statistics (eval mode), not the statistics of the batch
it is given (train mode). This experiment trains a BN MLP, then measures held-out accuracy
(1) in eval mode, (2) with batch statistics over held-out batches of ``batch_size`` and of 2,
(3) after a distribution shift of the inputs (``x -> shift_scale * x + shift_offset``, as a
change of sensor gain and offset would do) with the now stale running statistics, and
(4) after recalibrating the running statistics on unlabeled shifted training inputs with
``batchnorm.recalibrate`` (no weight changes).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, seeded
from batchnorm.lab.models import MLP, bn_implementation
from batchnorm.lab.train import accuracy, train

NAME = "train-eval"
TITLE = "Train vs eval statistics, stale statistics and recalibration"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 1500  # SGD steps
    batch_size: int = 60  # examples per step, and per held-out batch in batch-statistics mode
    lr: float = 0.1  # SGD learning rate
    hidden: tuple[int, ...] = (100, 100, 100)  # hidden widths
    shift_scale: float = 0.5  # the shift multiplies every input by this ...
    shift_offset: float = 1.0  # ... then adds this (in units of the data's standard deviation)
    recalibration_batches: int = 50  # batches of shifted, unlabeled training inputs for recalibration
    seed: int = 0  # weights and batch order


@torch.no_grad()
def _batch_stats_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int) -> float:
    """Accuracy when each held-out batch is normalized with its own statistics (train mode)."""
    probe = copy.deepcopy(model).train()  # a copy: train mode would update the running statistics
    n = len(y) // batch_size * batch_size
    return accuracy(probe, x[:n], y[:n], batch_size=batch_size)


def _recalibrate(model: torch.nn.Module, x: np.ndarray, config: Config) -> torch.nn.Module:
    from batchnorm import recalibrate

    batches = [torch.from_numpy(x[i : i + config.batch_size]) for i in range(0, len(x), config.batch_size)]
    return recalibrate(model, batches, num_batches=config.recalibration_batches, progress=False)


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    model = seeded(
        config.seed,
        lambda: MLP(data.num_features, data.num_classes, config.hidden, activation="relu", norm="bn"),
    )
    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        eval_every=config.steps,
        advance=bars.task("train-eval", config.steps),
    )
    std = float(data.x_train.std())

    def shift(x: np.ndarray) -> np.ndarray:
        return (config.shift_scale * x + config.shift_offset * std).astype(np.float32)

    x, y = data.x_test, data.y_test
    model.eval()
    clean = {
        "eval (running stats)": accuracy(model, x, y),
        f"batch stats, batch {config.batch_size}": _batch_stats_accuracy(model, x, y, config.batch_size),
        "batch stats, batch 2": _batch_stats_accuracy(model, x, y, 2),
    }
    shifted = {
        "eval (stale running stats)": accuracy(model, shift(x), y),
        f"batch stats, batch {config.batch_size}": _batch_stats_accuracy(
            model, shift(x), y, config.batch_size
        ),
    }
    n_recal = config.recalibration_batches * config.batch_size
    _recalibrate(model, shift(data.x_train[:n_recal]), config)
    model.eval()
    shifted["eval after recalibration"] = accuracy(model, shift(x), y)
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "train_history": history.as_dict(),
        "clean": clean,
        "shifted": shifted,
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    fig, (ax_clean, ax_shift) = plots.figure(
        f"{TITLE} ({results['data']['name']})",
        [
            ("held-out data as trained", "", "accuracy"),
            (
                f"after a shift x -> {results['config']['shift_scale']}x "
                f"+ {results['config']['shift_offset']} std",
                "",
                "accuracy",
            ),
        ],
        width=6.0,
    )
    colors = [plots.COLORS["bn"], plots.COLORS["ghost"], plots.COLORS["none"], plots.COLORS["group"]]
    for ax, part in ((ax_clean, results["clean"]), (ax_shift, results["shifted"])):
        names = list(part)
        bars = ax.bar(range(len(names)), [part[n] for n in names], color=colors[: len(names)], label=names)
        ax.bar_label(bars, labels=[f"{part[n]:.1%}" for n in names], fontsize=8)
        ax.set_xticks(
            range(len(names)), [n.replace(" (", "\n(").replace(", ", ",\n") for n in names], fontsize=8
        )
        ax.set_ylim(0, 1.05)
    return [plots.save(fig, Path(out_dir) / "train_eval.png")]


def claims(results: dict) -> list[dict]:
    clean, shifted = results["clean"], results["shifted"]
    eval_acc = clean["eval (running stats)"]
    tiny = clean["batch stats, batch 2"]
    stale, fixed = shifted["eval (stale running stats)"], shifted["eval after recalibration"]
    return [
        claim(
            NAME,
            "predicting with batch statistics of tiny batches is worse than with running statistics",
            f"batch of 2: {tiny:.1%} vs eval mode {eval_acc:.1%}",
            tiny < eval_acc,
        ),
        claim(
            NAME,
            "stale running statistics hurt after a shift; recalibration repairs them",
            f"shifted: stale {stale:.1%}, recalibrated {fixed:.1%} (unshifted {eval_acc:.1%})",
            fixed > stale + 0.05,
        ),
    ]
