"""``batchnorm bench``: batchnorm against torch.nn, side by side, in one process.

See ``docs/benchmarks.md`` for what is measured and how to read the tables.
"""

from batchnorm.bench.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
