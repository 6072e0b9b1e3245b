"""``batchnorm info``: what is installed and which kernel runs for which input."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Versions, thread counts and the kernel table, as plain data."""
    import batchnorm
    from batchnorm.kernels import _buffers, _dispatch

    info: dict = {
        "batchnorm": batchnorm.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs",
        "versions": {p: _version(p) for p in ("numpy", "numba", "torch", "triton", "matplotlib", "rich")},
        "threads": _dispatch.num_threads(),
        "output_buffer_cache_mib": _buffers.cache_limit() >> 20,
        "kernels": _dispatch.backend_table() + _gpu_rows(),
    }
    return info


def _gpu_rows() -> list[dict[str, str]]:
    """Where torch tensors that the NumPy kernels cannot take go."""
    rows = [
        {
            "input": "torch bfloat16",
            "layout": "as float32",
            "kernel": "computed in float32 (NumPy has no bfloat16), cast back",
        }
    ]
    try:
        import torch
    except ImportError:
        return rows
    triton = _version("triton")
    if torch.cuda.is_available():
        state = f"triton {triton}, {torch.cuda.get_device_name()}"
    else:
        state = "no CUDA device here" + ("" if triton != "not installed" else "; triton not installed")
    rows.append({"input": "torch CUDA tensors", "layout": "any", "kernel": f"Triton kernels ({state})"})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the information as JSON")


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]batchnorm {info['batchnorm']}[/bold]  python {info['python']}  ({info['machine']})")
    console.print("  ".join(f"{k} {v}" for k, v in info["versions"].items()))
    console.print(
        f"kernel threads: {info['threads']}  output buffer cache: up to "
        f"{info['output_buffer_cache_mib']} MiB (BATCHNORM_BUFFER_CACHE_MB)"
    )
    table = Table(title="Kernel dispatch")
    for column in ("input", "layout", "kernel"):
        table.add_column(column)
    for row in info["kernels"]:
        table.add_row(row["input"], row["layout"], row["kernel"])
    console.print(table)
    return 0
