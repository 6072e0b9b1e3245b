"""Pieces every experiment uses: cached data loading, seeded model building, claim rows."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from batchnorm.lab.console import Bars
from batchnorm.lab.data import Dataset, load

__all__ = ["Bars", "claim", "data_for", "seeded"]


@functools.lru_cache(maxsize=4)
def _cached(name: str, data_dir: str | None, seed: int) -> Dataset:
    return load(name, data_dir=data_dir, seed=seed)


def data_for(config: Any) -> Dataset:
    """The data set a config names (``dataset``, ``data_dir``); generated data uses seed 0.

    The data seed stays 0 whatever the experiment seed, so seeds vary weights and batch order
    on the same data.
    """
    return _cached(config.dataset, None if config.data_dir is None else str(config.data_dir), 0)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with torch's generator set to ``seed``: same seed, same initial weights."""
    torch.manual_seed(seed)
    return build()


def claim(experiment: str, text: str, measured: str, held: bool) -> dict:
    """One row of the summary table: the claim, the figure this run measured, whether it held."""
    return {"experiment": experiment, "claim": text, "measured": measured, "held": bool(held)}


def fmt_steps(steps: int | None, total: int) -> str:
    return f"{steps} steps" if steps is not None else f"not within {total} steps"


def sweep_point(
    config: Any,
    bars: Bars,
    description: str,
    *,
    norm: str,
    lr: float,
    init_scale: float = 1.0,
    batch_size: int | None = None,
    activation: str | None = None,
) -> dict:
    """Train one MLP of ``config`` (hidden, activation, steps, seed) and return its history.

    Shared by the sweeps (lr, init, batch size): one point of a curve is one training run.
    """
    from batchnorm.lab.models import MLP
    from batchnorm.lab.train import accuracy, train

    data = data_for(config)
    batch = batch_size or config.batch_size
    model = seeded(
        config.seed,
        lambda: MLP(
            data.num_features,
            data.num_classes,
            config.hidden,
            activation=activation or config.activation,
            norm=norm,
            init_scale=init_scale,
            norm_options=getattr(config, "norm_options", None),
        ),
    )
    history = train(
        model,
        data,
        steps=config.steps,
        batch_size=batch,
        lr=lr,
        seed=config.seed,
        eval_every=config.steps,
        eval_size=config.eval_size,
        advance=bars.task(description, config.steps),
    )
    model.eval()
    n = min(config.eval_size, len(data.y_train))
    train_accuracy = accuracy(model, data.x_train[:n], data.y_train[:n])
    return {
        "final_accuracy": history.final_accuracy,
        "train_accuracy": train_accuracy,
        "diverged_at": history.diverged_at,
    }
