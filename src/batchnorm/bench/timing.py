"""Timing: interleaved medians, the in-run copy bandwidth, and the machine line."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any


def interleaved(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 2, number: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each callable, ``repeats`` samples each.

    Round-robin within every repeat (starting at a different implementation each time), so a
    slow drift of the machine (another process, turbo, thermal) hits every implementation alike.
    A sample times ``number`` consecutive calls of one implementation and keeps their mean: with
    1, each call runs right after the other implementations' calls, with the caches they left;
    with more, the calls after the first find the caches as their own previous call left them.
    """
    if number < 1:
        raise ValueError(f"number: expected calls per sample >= 1, got {number}")
    for call in calls.values():
        for _ in range(warmup):  # compiles kernels, touches the outputs' pages once
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            call = calls[name]
            start = time.perf_counter()
            for _ in range(number):
                call()
            samples[name].append((time.perf_counter() - start) / number)
    return samples


def calls_per_sample(calls: dict[str, Callable[[], Any]], target_s: float = 1e-3, limit: int = 1000) -> int:
    """How many consecutive calls make a sample of about ``target_s`` for the fastest callable
    (its quickest of three timed calls, after a warm-up call): what ``--number auto`` uses, the
    same count for every implementation of a comparison."""
    fastest = float("inf")
    for call in calls.values():
        call()
        for _ in range(3):
            start = time.perf_counter()
            call()
            fastest = min(fastest, time.perf_counter() - start)
    return max(1, min(limit, round(target_s / max(fastest, 1e-9))))


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's dynamic mmap threshold stops at 32 MiB on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), with a
# trim threshold of twice that
_STEADY_MMAP_BYTES = 32 << 20
_STEADY_TRIM_BYTES = 64 << 20


def steady_allocator() -> str:
    """Put glibc's malloc where a long-running training process has it; returns what was done.

    glibc serves an allocation above its mmap threshold (128 KiB at start) with fresh pages,
    page-faulted and zero-filled on every call, and raises the threshold to the size of each
    such block freed (up to 32 MiB). A training process reaches that maximum within its first
    steps; a benchmark process reaches a different state depending on which shapes ran before:
    torch.nn's forward+backward on (4096, 256) measured 2.2-2.8 ms in a run of three small shapes
    and 1.3 ms in the full suite, after the large shapes had raised the threshold. Fixing it at
    the maximum (and the trim threshold at twice that) times every shape in the steady state,
    whatever ran before. Our kernels' outputs come from their own buffer cache either way.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or name is None:
        return "default (not glibc)"
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return "default (no mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not (
        mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_BYTES) and mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM_BYTES)
    ):
        return "default (mallopt refused)"
    return "glibc malloc: mmap threshold 32 MiB, trim threshold 64 MiB (its dynamic maximum)"


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
        + (f"; allocator: {info['allocator']}" if "allocator" in info else "")
    )
