"""Figure 1 of Ioffe & Szegedy (2015): a sigmoid MLP trained with and without BN.

(a) held-out accuracy against training step; (b, c) the 15th, 50th and 85th percentiles of the
input to one sigmoid of the last hidden layer over training, without and with BN. The paper's
claims: BN trains faster, and the distribution of a layer's inputs stays stable with BN while
it drifts without ("internal covariate shift").

The percentiles are measured in eval mode on fixed held-out samples; step 0 is left out of
them because BN's running statistics still hold their initial (0, 1) there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, fmt_steps, seeded
from batchnorm.lab.models import MLP, bn_implementation
from batchnorm.lab.train import train

NAME = "fig1"
TITLE = "Figure 1: faster training and stable sigmoid inputs"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name (the paper used MNIST: --dataset mnist)
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 5000  # SGD steps per network (the paper ran 50,000)
    batch_size: int = 60  # examples per step, as in the paper
    lr: float = 0.5  # SGD learning rate, the same for both networks
    hidden: tuple[int, ...] = (100, 100, 100)  # hidden widths, the paper's 3 x 100
    init_scale: float = 1.0  # Gaussian init std = init_scale / sqrt(fan_in)
    neuron: int = 0  # which sigmoid of the last hidden layer to watch
    eval_every: int = 50  # steps between held-out evaluations
    eval_size: int = 2000  # held-out samples per evaluation
    probe_size: int = 1000  # held-out samples for the sigmoid-input percentiles
    target: float | None = None  # accuracy whose first crossing is reported; None: per data set
    seed: int = 0  # weights and batch order


def _run_one(config: Config, norm: str, bars: Bars) -> dict:
    data = data_for(config)
    model = seeded(
        config.seed,
        lambda: MLP(
            data.num_features,
            data.num_classes,
            config.hidden,
            activation="sigmoid",
            norm=norm,
            init_scale=config.init_scale,
        ),
    )
    probe = torch.from_numpy(data.x_test[: config.probe_size])
    percentiles: list[list[float]] = []
    captured: list[torch.Tensor] = []
    hook = model.activations[-1].register_forward_hook(lambda m, inp, out: captured.append(inp[0]))

    def on_eval(step: int, net: torch.nn.Module) -> None:
        captured.clear()
        with torch.no_grad():
            net(probe)
        values = captured[-1][:, config.neuron].numpy()
        percentiles.append(np.percentile(values, [15, 50, 85]).tolist())

    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        eval_every=config.eval_every,
        eval_size=config.eval_size,
        on_eval=on_eval,
        advance=bars.task(f"fig1 {plots.label(norm)}", config.steps),
    )
    hook.remove()
    p = np.asarray(percentiles)[1:]  # step 0 left out: BN's running statistics are still (0, 1)
    # Drift: how far each percentile moved from the first tenth of training to the last tenth,
    # averaged within each tenth so single noisy evaluations do not dominate; relative to the
    # mean spread p85 - p15.
    w = max(1, len(p) // 10)
    drift = np.abs(p[-w:].mean(0) - p[:w].mean(0)) if len(p) else np.zeros(0)
    return {
        **history.as_dict(),
        "percentile_steps": history.steps[1 : len(percentiles)],
        "percentiles": p.tolist(),
        "steps_to_target": history.steps_to(config.target),
        "drift": drift.tolist(),
        "relative_drift": float(drift.mean() / np.mean(p[:, 2] - p[:, 0])) if len(p) else None,
    }


# A target both networks can reach on each data set (an MLP tops out near 60-70% on MNIST-1D).
TARGETS = {"mnist": 0.9, "mnist1d": 0.4, "synthetic": 0.8}


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    if config.target is None:
        config = replace(config, target=TARGETS.get(config.dataset, 0.5))
    data = data_for(config)
    runs = {norm: _run_one(config, norm, bars) for norm in ("none", "bn")}
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "runs": runs,
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    cfg, runs = results["config"], results["runs"]
    fig, (ax_acc, *ax_p) = plots.figure(
        f"{TITLE} ({results['data']['name']}, batch {cfg['batch_size']}, lr {cfg['lr']})",
        [
            ("(a) held-out accuracy", "training step", "accuracy"),
            ("(b) sigmoid input without BN", "training step", "input to sigmoid"),
            ("(c) sigmoid input with BN", "training step", "input to sigmoid"),
        ],
    )
    for norm, r in runs.items():
        ax_acc.plot(r["steps"], r["test_accuracy"], color=plots.COLORS[norm], label=plots.label(norm))
    ax_acc.axhline(
        cfg["target"], color="black", linestyle=":", linewidth=1, label=f"{cfg['target']:.0%} target"
    )
    lows, highs = [], []
    for ax, norm in zip(ax_p, ("none", "bn"), strict=True):
        r = runs[norm]
        p = np.asarray(r["percentiles"])
        if p.size == 0:
            continue
        for i, (q, style) in enumerate(zip((15, 50, 85), (":", "-", "--"), strict=True)):
            ax.plot(
                r["percentile_steps"],
                p[:, i],
                color=plots.COLORS[norm],
                linestyle=style,
                label=f"{q}th percentile",
            )
        lows.append(p.min())
        highs.append(p.max())
    if lows:  # one y-range for (b) and (c), so the two drifts compare by eye
        pad = 0.05 * (max(highs) - min(lows) + 1e-9)
        for ax in ax_p:
            ax.set_ylim(min(lows) - pad, max(highs) + pad)
    return [plots.save(fig, Path(out_dir) / "fig1.png")]


def claims(results: dict) -> list[dict]:
    cfg, none, bn = results["config"], results["runs"]["none"], results["runs"]["bn"]
    faster = bn["steps_to_target"] is not None and (
        none["steps_to_target"] is None or bn["steps_to_target"] < none["steps_to_target"]
    )
    rows = [
        claim(
            NAME,
            f"BN reaches {cfg['target']:.0%} held-out accuracy in fewer steps",
            f"BN {fmt_steps(bn['steps_to_target'], cfg['steps'])}, "
            f"plain {fmt_steps(none['steps_to_target'], cfg['steps'])}; "
            f"final {bn['final_accuracy']:.1%} vs {none['final_accuracy']:.1%}",
            faster,
        )
    ]
    if bn["relative_drift"] is not None and none["relative_drift"] is not None:
        rows.append(
            claim(
                NAME,
                "sigmoid inputs drift less with BN (internal covariate shift)",
                f"15/50/85th percentiles moved {'/'.join(f'{d:.2f}' for d in bn['drift'])} with BN vs "
                f"{'/'.join(f'{d:.2f}' for d in none['drift'])} without (first vs last tenth of training); "
                f"relative to the spread {bn['relative_drift']:.2f} vs {none['relative_drift']:.2f}",
                bn["relative_drift"] < none["relative_drift"],
            )
        )
    return rows
