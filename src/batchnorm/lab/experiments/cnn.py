"""A small ResNet-style CNN (conv-norm-ReLU basic blocks) trained with and without BN.

Conv1d on signals (MNIST-1D), Conv2d on images (MNIST). Without BN the convolutions keep their
biases and the same initialization (torch's default), so BN is the only difference. The claim:
with BN the residual network trains faster and ends higher at the same learning rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, seeded
from batchnorm.lab.models import ResNet, bn_implementation
from batchnorm.lab.train import train

NAME = "cnn"
TITLE = "A small ResNet with and without BN"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 1000  # SGD steps per network
    batch_size: int = 60  # examples per step
    lr: float = 0.05  # SGD learning rate, the same for both
    momentum: float = 0.9  # SGD momentum, the usual choice for CNNs
    width: int = 16  # channels of the first stage (doubled at each stage)
    stages: int = 2  # residual stages (one basic block each)
    eval_every: int = 50  # steps between held-out evaluations
    eval_size: int = 2000  # held-out samples per evaluation
    seed: int = 0  # weights and batch order


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    dim = len(data.sample_shape) - 1
    runs = {}
    for norm in ("none", "bn"):
        model = seeded(
            config.seed,
            lambda norm=norm: ResNet(
                data.sample_shape[0],
                data.num_classes,
                width=config.width,
                stages=config.stages,
                norm=norm,
                dim=dim,
            ),
        )
        history = train(
            model,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            eval_every=config.eval_every,
            eval_size=config.eval_size,
            momentum=config.momentum,
            advance=bars.task(f"cnn {plots.label(norm)}", config.steps),
        )
        runs[norm] = history.as_dict()
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "runs": runs,
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    cfg = results["config"]
    fig, (ax_acc, ax_loss) = plots.figure(
        f"{TITLE} ({results['data']['name']}, width {cfg['width']}, {cfg['stages']} stages, lr {cfg['lr']})",
        [
            ("held-out accuracy", "training step", "accuracy"),
            ("training loss", "training step", "cross-entropy"),
        ],
    )
    for norm, r in results["runs"].items():
        ax_acc.plot(r["steps"], r["test_accuracy"], color=plots.COLORS[norm], label=plots.label(norm))
        ax_loss.plot(
            range(1, len(r["train_loss"]) + 1),
            r["train_loss"],
            color=plots.COLORS[norm],
            alpha=0.7,
            linewidth=0.8,
            label=plots.label(norm),
        )
    ax_acc.set_ylim(0, 1)
    ax_loss.set_yscale("log")
    return [plots.save(fig, Path(out_dir) / "cnn.png")]


def claims(results: dict) -> list[dict]:
    none, bn = results["runs"]["none"], results["runs"]["bn"]
    half = len(bn["test_accuracy"]) // 2
    return [
        claim(
            NAME,
            "a ResNet trains faster and ends higher with BN",
            f"held-out accuracy at step {bn['steps'][half]}: {bn['test_accuracy'][half]:.1%} with BN vs "
            f"{none['test_accuracy'][half]:.1%} without; "
            f"final {bn['final_accuracy']:.1%} vs {none['final_accuracy']:.1%}",
            bn["final_accuracy"] > none["final_accuracy"]
            and bn["test_accuracy"][half] > none["test_accuracy"][half],
        )
    ]
