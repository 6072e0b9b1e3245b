"""``batchnorm lab EXPERIMENT``: run one lab experiment and write its plots, JSON and report."""

from __future__ import annotations

import argparse
import dataclasses
import importlib

from batchnorm.lab.data import DATASETS
from batchnorm.lab.experiments import EXPERIMENTS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=list(EXPERIMENTS), help="which experiment to run")
    parser.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist1d",
        help="data set (default mnist1d: generated, offline); mnist reads --data-dir",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with MNIST IDX files (gz or raw); downloaded there if missing",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="SGD steps per training run (default: the experiment's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batch order (default 0)")
    parser.add_argument("--out", default=None, help="output folder (default ./bn-lab/EXPERIMENT)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the models are small)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_for(experiment: str, args: argparse.Namespace) -> object:
    """The experiment's Config with the command line's overrides applied."""
    module = importlib.import_module(EXPERIMENTS[experiment])
    overrides: dict = {"dataset": args.dataset, "data_dir": args.data_dir, "seed": args.seed}
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit(f"batchnorm lab: --steps must be >= 1, got {args.steps}")
        overrides["steps"] = args.steps
    config = module.Config(**overrides)
    if "eval_every" in {f.name for f in dataclasses.fields(config)}:
        # about 50 evaluations per run, whatever the number of steps
        config = dataclasses.replace(
            config, eval_every=max(1, min(config.eval_every, config.steps // 50 or 1))
        )
    return config


def run(args: argparse.Namespace) -> int:
    from batchnorm.lab.runner import run_experiments

    config = config_for(args.experiment, args)
    out = args.out or f"bn-lab/{args.experiment}"
    run_experiments(
        [(EXPERIMENTS[args.experiment], config)],
        out,
        title=f"batchnorm lab: {args.experiment}",
        threads=args.threads,
        progress=not args.no_progress,
    )
    return 0
