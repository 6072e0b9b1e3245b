"""Timing: interleaved medians, the in-run copy bandwidth, and the machine line."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` samples each.

    Round-robin within every repeat (starting at a different implementation each time), so a
    slow drift of the machine (another process, turbo, thermal) hits every implementation alike.
    """
    for call in calls.values():
        for _ in range(warmup):  # compiles kernels, touches the outputs' pages once
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            start = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 9) -> float:
    """Bytes/s of ``dst.copy_(src)`` on buffers far larger than the last-level cache, counting
    read + write (2 * nbytes per copy); the median of ``repeats`` with torch's threads."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / median(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine() -> dict[str, Any]:
    """CPU model, cores, threads and versions, as recorded with every result."""
    import numba
    import torch

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("batchnorm", "numpy", "numba", "torch")},
        "platform": platform.platform(),
    }


def machine_line(info: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return (
        f"{info['cpu']}, {info['logical_cpus']} logical CPUs, threads torch {info['torch_threads']} / "
        f"numba {info['numba_threads']}; python {info['python']}, {versions}"
    )
