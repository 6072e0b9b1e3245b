"""Distributions: what a BN layer does to the values passing through it, in an MLP and a CNN.

Each network is trained with BN for a while; then, on held-out data in eval mode, a forward
hook reads one BN layer's input (the pre-activations from the linear / conv layer) and output.
Per feature (channel), BN maps ``x`` to ``gamma * x_hat + beta`` with ``x_hat`` of mean 0 and
variance 1, so ``(mean(y) - beta) / gamma`` should be ~0 and ``std(y) / |gamma|`` ~1 on held-out
data if the running statistics describe it, whatever the input's means and scales were.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from batchnorm.lab import plots
from batchnorm.lab.experiments._common import Bars, claim, data_for, seeded
from batchnorm.lab.models import MLP, ResNet, bn_implementation
from batchnorm.lab.train import train

NAME = "distributions"
TITLE = "Distributions before and after a BN layer"


@dataclass
class Config:
    dataset: str = "mnist1d"  # data set name
    data_dir: str | None = None  # folder with MNIST IDX files (mnist only)
    steps: int = 500  # SGD steps for each network before the measurement
    batch_size: int = 60  # examples per step
    lr: float = 0.1  # SGD learning rate
    hidden: tuple[int, ...] = (100, 100, 100)  # MLP hidden widths; the last hidden BN is read
    width: int = 16  # CNN base width; the deepest block's first BN is read
    features_shown: int = 16  # features (channels) in the per-feature bar plot
    probe_size: int = 1000  # held-out samples pushed through the trained network
    tolerance: float = 0.2  # bound on |(mean-beta)/gamma| and |std/|gamma|-1|, averaged over features
    seed: int = 0  # weights and batch order


def _measure(model: torch.nn.Module, bn: torch.nn.Module, x: np.ndarray) -> dict:
    seen: dict[str, torch.Tensor] = {}
    hook = bn.register_forward_hook(lambda m, inp, out: seen.update(before=inp[0], after=out))
    model.eval()
    with torch.no_grad():
        model(torch.from_numpy(x))
    hook.remove()

    def per_feature(t: torch.Tensor) -> np.ndarray:
        # (N, C) or (N, C, *spatial) -> (C, values): statistics per channel, as BN takes them.
        return t.transpose(0, 1).reshape(t.shape[1], -1).numpy().astype(np.float64)

    before, after = per_feature(seen["before"]), per_feature(seen["after"])
    gamma, beta = bn.weight.detach().numpy().astype(np.float64), bn.bias.detach().numpy().astype(np.float64)
    return {
        # a thinned, rounded sample for the histograms keeps results.json small
        "before_values": np.round(before.ravel()[:: max(1, before.size // 5000)], 4).tolist(),
        "after_values": np.round(after.ravel()[:: max(1, after.size // 5000)], 4).tolist(),
        "before_mean": before.mean(1).tolist(),
        "before_std": before.std(1).tolist(),
        "after_mean": after.mean(1).tolist(),
        "after_std": after.std(1).tolist(),
        "gamma": gamma.tolist(),
        "beta": beta.tolist(),
        # 0 and 1 when BN standardizes this data: the checks behind the claim.
        "mean_abs_centred_mean": float(np.mean(np.abs((after.mean(1) - beta) / gamma))),
        "mean_abs_scaled_std_error": float(np.mean(np.abs(after.std(1) / np.abs(gamma) - 1))),
        "max_abs_centred_mean": float(np.max(np.abs((after.mean(1) - beta) / gamma))),
        "max_abs_scaled_std_error": float(np.max(np.abs(after.std(1) / np.abs(gamma) - 1))),
    }


def run(config: Config, bars: Bars | None = None) -> dict:
    bars = bars or Bars()
    data = data_for(config)
    dim = len(data.sample_shape) - 1
    mlp = seeded(
        config.seed,
        lambda: MLP(data.num_features, data.num_classes, config.hidden, activation="relu", norm="bn"),
    )
    cnn = seeded(
        config.seed,
        lambda: ResNet(data.sample_shape[0], data.num_classes, width=config.width, norm="bn", dim=dim),
    )
    probe = data.x_test[: config.probe_size]
    layers = {}
    for name, model, bn in (("mlp", mlp, mlp.norms[-1]), ("cnn", cnn, cnn.blocks[-1].norm1)):
        train(
            model,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            eval_every=config.steps,
            advance=bars.task(f"distributions {name}", config.steps),
        )
        layers[name] = _measure(model, bn, probe)
    return {
        "experiment": NAME,
        "config": asdict(config),
        "data": data.describe(),
        "bn_implementation": bn_implementation(),
        "layers": layers,
    }


def plot(results: dict, out_dir: str | Path) -> list[Path]:
    paths = []
    k = results["config"]["features_shown"]
    for name, layer in results["layers"].items():
        kind = "feature" if name == "mlp" else "channel"
        fig, (ax_before, ax_after, ax_bars) = plots.figure(
            f"{TITLE}: {name.upper()} ({results['data']['name']}, after {results['config']['steps']} steps)",
            [
                ("input of BN (pre-activations)", "value", "count"),
                ("output of BN", "value", "count"),
                (f"per-{kind} mean +- std (first {k})", kind, "value"),
            ],
        )
        ax_before.hist(
            layer["before_values"], bins=80, color=plots.COLORS["before"], label="all values, before BN"
        )
        ax_after.hist(
            layer["after_values"], bins=80, color=plots.COLORS["after"], label="all values, after BN"
        )
        idx = np.arange(min(k, len(layer["before_mean"])))
        for offset, which, color in (
            (-0.2, "before", plots.COLORS["before"]),
            (0.2, "after", plots.COLORS["after"]),
        ):
            ax_bars.errorbar(
                idx + offset,
                np.asarray(layer[f"{which}_mean"])[idx],
                yerr=np.asarray(layer[f"{which}_std"])[idx],
                fmt="o",
                color=color,
                capsize=2,
                label=f"{which} BN",
            )
        ax_bars.plot(idx, np.asarray(layer["beta"])[idx], "x", color="black", label="beta (learned mean)")
        paths.append(plots.save(fig, Path(out_dir) / f"distributions_{name}.png"))
    return paths


def claims(results: dict) -> list[dict]:
    tol = results["config"]["tolerance"]
    rows = []
    for name, layer in results["layers"].items():
        spread = (min(layer["before_std"]), max(layer["before_std"]))
        kind = "feature" if name == "mlp" else "channel"
        rows.append(
            claim(
                NAME,
                f"BN standardizes each {kind} of the {name.upper()} on held-out data",
                f"input std per feature {spread[0]:.2g}-{spread[1]:.2g}; output |(mean-beta)/gamma| "
                f"{layer['mean_abs_centred_mean']:.3f} (max {layer['max_abs_centred_mean']:.2f}), "
                f"|std/|gamma|-1| {layer['mean_abs_scaled_std_error']:.3f} "
                f"(max {layer['max_abs_scaled_std_error']:.2f}), mean over {kind}s",
                layer["mean_abs_centred_mean"] < tol and layer["mean_abs_scaled_std_error"] < tol,
            )
        )
    return rows
