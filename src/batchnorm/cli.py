"""The ``batchnorm`` command: argument parsing only.

Each subcommand lives in the layer it belongs to, as a module with ``add_arguments(parser)``
and ``run(args) -> int``; it is imported only when that subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import batchnorm

# subcommand -> (module providing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("batchnorm.info", "versions, threads and which kernel runs for which dtype and layout"),
    "demo": ("batchnorm.lab.demo", "the quick tour: train, plot and report what BN does (offline)"),
    "lab": ("batchnorm.lab.cli", "run one lab experiment (fig1, lr, init, batch-size, ...)"),
    "bench": ("batchnorm.bench", "benchmark batchnorm against torch.nn side by side"),
    "diagnose": ("batchnorm.tools.diagnose", "report train/eval mismatch of a model's BN layers"),
    "ddp": ("batchnorm.lab.ddp", "data-parallel example on CPU: SyncBatchNorm vs per-process BN"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"batchnorm {batchnorm.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # add_help=False: "--help" reaches the subcommand's own parser, built in main().
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first so only the chosen subcommand's module is imported.
    known, _ = parser.parse_known_args(argv)
    if known.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[known.command][0])
    command_parser = argparse.ArgumentParser(
        prog=f"batchnorm {known.command}", description=COMMANDS[known.command][1]
    )
    module.add_arguments(command_parser)
    args = command_parser.parse_args(argv[argv.index(known.command) + 1 :])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
