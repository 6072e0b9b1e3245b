"""The lab's experiments, one module each: ``Config``, ``run(config, bars) -> results``,
``plot(results, out_dir) -> [png paths]`` and ``claims(results) -> [claim rows]``."""

from __future__ import annotations

# experiment name (as typed on the command line) -> module
EXPERIMENTS: dict[str, str] = {
    "fig1": "batchnorm.lab.experiments.fig1",
    "lr": "batchnorm.lab.experiments.lr",
    "init": "batchnorm.lab.experiments.init",
    "batch-size": "batchnorm.lab.experiments.batch_size",
    "distributions": "batchnorm.lab.experiments.distributions",
    "train-eval": "batchnorm.lab.experiments.train_eval",
    "cnn": "batchnorm.lab.experiments.cnn",
}

__all__ = ["EXPERIMENTS"]
