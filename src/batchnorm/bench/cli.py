"""``batchnorm bench``: parse, configure threads, run the chosen measurement, report.

Modes (default: the per-shape suite): ``--model``, ``--startup``, ``--sync``, ``--fold``,
``--device cuda``. The effective configuration and the machine are printed and saved in the
JSON beside the results.
"""

from __future__ import annotations

import argparse
from typing import Any

from batchnorm.bench.suite import DEFAULT_IMPLEMENTATIONS, DEFAULT_SHAPES, IMPLEMENTATIONS, MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="comma-separated shapes like 16x64x112x112,256x1024,cl:16x64x56x56,"
        "f64:16x256x28x28 (default: issue #7's suite)",
    )
    parser.add_argument(
        "--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}"
    )
    parser.add_argument(
        "--impls",
        default=",".join(DEFAULT_IMPLEMENTATIONS),
        help=f"comma-separated subset of {','.join(IMPLEMENTATIONS)}",
    )
    parser.add_argument(
        "--repeats", type=int, default=15, help="timed repeats per measurement (>= 15 for records)"
    )
    parser.add_argument(
        "--number",
        default="1",
        help="consecutive calls per timed sample: 1 (each call between the other implementations' "
        "calls, the default) or a count, or 'auto' (about 1 ms of the fastest per sample)",
    )
    parser.add_argument(
        "--allocator",
        default="steady",
        choices=("steady", "default"),
        help="steady: glibc malloc's thresholds fixed where a long-running process has them "
        "(torch.nn's outputs then reuse freed memory whatever ran before); default: leave them",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="threads for torch and the numba kernels (default: torch's)"
    )
    parser.add_argument("--json", metavar="FILE", help="write the results, configuration and machine as JSON")
    parser.add_argument("--plot", metavar="FILE", help="write a bar chart (PNG) of the per-shape suite")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--model",
        action="store_true",
        help="training step of a ResNet-18-style CNN (32x32, batch 64): torch BN+ReLU vs "
        "batchnorm BN+ReLU vs BatchNormAct2d, and saved activation memory; with --device cuda: torch.nn "
        "BatchNorm2d vs batchnorm.nn.BatchNorm2d, float32/bfloat16, NCHW/channels-last",
    )
    mode.add_argument(
        "--startup",
        action="store_true",
        help="import + first call in a fresh process, cold and warm numba cache, per layout",
    )
    mode.add_argument(
        "--sync", action="store_true", help="SyncBatchNorm on 2 gloo processes vs local BatchNorm2d"
    )
    mode.add_argument("--fold", action="store_true", help="eval model with BN vs batchnorm.fold(model)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda runs batchnorm.bench.gpu's suite (needs a GPU)",
    )
    parser.add_argument("--width", type=int, default=16, help="--model/--fold: base width (64 = ResNet-18)")
    parser.add_argument("--batch", type=int, default=64, help="--model/--fold: batch size")


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _split(text: str, allowed: Any, option: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"{option}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def _checked_options(args: argparse.Namespace) -> tuple[list, list[str], list[str]]:
    """The suite's cases, modes and implementations; ValueError naming the bad option."""
    from batchnorm.bench.suite import parse_shapes

    if args.repeats < 1:
        raise ValueError(f"--repeats: expected a positive integer, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
    for option in ("width", "batch"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option}: expected a positive integer, got {getattr(args, option)}")
    if args.number != "auto" and not (args.number.isdigit() and int(args.number) >= 1):
        raise ValueError(f"--number: expected a positive integer or 'auto', got {args.number!r}")
    cases = parse_shapes(args.shapes)
    modes = _split(args.modes, MODES, "--modes")
    impls = _split(args.impls, IMPLEMENTATIONS, "--impls")
    return cases, modes, impls


def _suite(args: argparse.Namespace, plan: tuple, console: Any, payload: dict) -> None:
    from rich.progress import Progress

    from batchnorm.bench import report
    from batchnorm.bench.kernels import run_suite

    cases, modes, impls = plan
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=len(cases) * len(modes))
        suite = run_suite(
            cases,
            impls,
            modes,
            args.repeats,
            progress=lambda: progress.advance(task),
            number=args.number if args.number == "auto" else int(args.number),
        )
    measured = suite["bandwidth_samples_Bps"]
    spread = (
        f", median of {len(measured)} measurements, one before each shape: "
        f"{min(measured) / 1e9:.1f}-{max(measured) / 1e9:.1f} GB/s"
        if len(measured) > 1
        else ""
    )
    console.print(
        f"copy bandwidth (read + write, measured in this run{spread}): "
        f"{suite['bandwidth_Bps'] / 1e9:.1f} GB/s"
    )
    for table in report.suite_tables(suite):
        console.print(table)
    for s in suite["skipped"]:
        console.print(f"[yellow]skipped {s['implementation']} on {s['case']} {s['mode']}: {s['reason']}")
    payload["suite"] = suite
    if args.plot:
        report.plot(args.plot, suite)
        console.print(f"plot written to {args.plot}")


def _sync(console: Any) -> dict:
    try:
        from batchnorm.lab.ddp import measure_sync_overhead
    except ImportError as err:
        raise RuntimeError(
            f"--sync needs batchnorm.lab.ddp.measure_sync_overhead, which is missing ({err})"
        ) from err
    result = measure_sync_overhead()
    rows = (
        result if isinstance(result, list) else [result] if isinstance(result, dict) else [{"result": result}]
    )
    return {"title": "SyncBatchNorm on 2 gloo processes vs local BatchNorm2d", "rows": rows}


def _cuda(args: argparse.Namespace, console: Any) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        console.print(
            "--device cuda: no CUDA device is available here (torch.cuda.is_available() is "
            "False); run it on a machine with an NVIDIA GPU and a CUDA build of torch."
        )
        return None
    from batchnorm.bench.gpu import run_cuda_suite, training_step

    if args.model:
        rows = [
            training_step(args.batch, 32, args.width, dtype, channels_last, args.repeats)
            for dtype in ("float32", "bfloat16")
            for channels_last in (False, True)
        ]
        return {
            "title": f"CUDA: ResNet-18-style training step (width {args.width}, batch {args.batch}, 32x32, "
            f"median of {args.repeats})",
            "rows": rows,
        }
    return {
        "title": f"CUDA: batchnorm vs torch.nn (median of {args.repeats})",
        "rows": run_cuda_suite(repeats=args.repeats),
    }


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from batchnorm.bench import model, report, timing

    console = Console()
    console.width = max(console.width, 160)  # the suite tables have up to 14 columns
    try:
        # Every option is checked before anything is measured, and a bad one ends the run
        # with its message rather than a traceback.
        plan = _checked_options(args)
    except ValueError as err:
        raise SystemExit(f"batchnorm bench: {err}") from None
    _set_threads(args.threads)
    info = timing.machine()
    if args.device == "cpu":
        info["allocator"] = timing.steady_allocator() if args.allocator == "steady" else "default"
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
    console.print(f"[bold]machine[/bold]: {timing.machine_line(info)}")
    console.print(f"[bold]config[/bold]: {config}")
    payload: dict[str, Any] = {"machine": info, "config": config}
    section = None
    if args.device == "cuda":
        section = _cuda(args, console)
        if section is None:
            return 2
    elif args.model:
        rows = model.model_rows(args.width, args.batch, args.repeats)
        section = {
            "title": f"ResNet-18-style training step (width {args.width}, batch {args.batch}, "
            f"32x32, median of {args.repeats})",
            "rows": rows,
        }
    elif args.fold:
        rows = model.fold_rows(args.width, args.batch, args.repeats)
        section = {
            "title": f"eval forward, BN vs batchnorm.fold (width {args.width}, batch {args.batch})",
            "rows": rows,
        }
    elif args.startup:
        from batchnorm.bench.startup import startup_rows

        section = {
            "title": "start-up: import + first call (train fwd+bwd and eval) in a fresh process",
            "rows": startup_rows(),
        }
    elif args.sync:
        section = _sync(console)
    else:
        _suite(args, plan, console, payload)
    if section is not None:
        console.print(report.simple_table(section["title"], section["rows"]))
        payload["section"] = section
    if args.json:
        report.write_json(args.json, payload)
        console.print(f"results written to {args.json}")
    return 0
