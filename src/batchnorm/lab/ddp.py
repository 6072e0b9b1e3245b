"""Data parallelism on one CPU machine: SyncBatchNorm vs per-process BatchNorm under DDP.

``batchnorm ddp`` spawns ``--procs`` processes that talk over gloo on the loopback interface
(127.0.0.1, a free port), trains the same small CNN twice with DistributedDataParallel - once
with per-process ``BatchNorm2d``, once converted with ``SyncBatchNorm.convert_sync_batchnorm``
- on a synthetic image task with a small per-process batch, and prints a comparison: loss,
held-out accuracy, how far the ranks' running statistics drift apart (and that
``distribute_bn`` fixes it), and time per step.

The launcher :func:`run_distributed` is reusable (the tests and :func:`measure_sync_overhead`,
the hook behind ``batchnorm bench``'s sync mode, run on it).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import queue as queue_module
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["DDPConfig", "add_arguments", "measure_sync_overhead", "run", "run_distributed", "train_worker"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _resolve(target: Callable[..., Any] | str) -> Callable[..., Any]:
    """A callable, or ``"path/to/file.py:function"`` loaded from that file (for test files,
    which pytest imports under names a spawned child cannot import)."""
    if callable(target):
        return target
    path, _, name = str(target).rpartition(":")
    spec = importlib.util.spec_from_file_location(f"_bn_dist_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"run_distributed: cannot load target file {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return getattr(module, name)


def _worker_main(
    rank: int,
    world_size: int,
    port: int,
    target: Any,
    args: tuple,
    results: Any,
    timeout: float,
    threads: int,
) -> None:
    # Thread counts must be set before torch/numba start their pools: 2 shared cores, N processes.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(threads)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            value = _resolve(target)(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with this traceback
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    target: Callable[..., Any] | str,
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 120.0,
    threads: int | None = None,
) -> list[Any]:
    """Run ``target(rank, world_size, *args)`` in ``world_size`` spawned gloo processes.

    The default process group is initialised on 127.0.0.1 (a free port) before ``target``
    runs and destroyed after. Returns the ranks' return values (picklable) in rank order.
    A failure on any rank raises ``RuntimeError`` carrying that rank's traceback; a run
    longer than ``timeout`` seconds kills every process and raises ``TimeoutError``.
    """
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(r, world_size, port, target, tuple(args), results, timeout, threads),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"run_distributed: ranks {sorted(set(range(world_size)) - set(values))} "
                    f"did not finish within {timeout:.0f} s"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue_module.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise RuntimeError(
                        f"run_distributed: rank(s) {dead} died (exit codes "
                        f"{[procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"run_distributed: rank {rank} failed:\n{value}")
            values[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]


@dataclass
class DDPConfig:
    """One ``batchnorm ddp`` run; saved with its results."""

    procs: int = 2  # processes (ranks), each a gloo peer on 127.0.0.1
    batch_per_proc: int = 4  # samples per process per step: small, where BN statistics get noisy
    steps: int = 150  # optimizer steps per model
    lr: float = 0.05  # SGD learning rate (momentum 0.9)
    classes: int = 4  # synthetic classes, one random template image each
    image: int = 12  # image side (1 channel)
    noise: float = 1.0  # std of the pixel noise added to a template
    eval_samples: int = 512  # held-out samples for accuracy
    seed: int = 0  # data and initialisation seed, the same on every rank
    timeout: float = 120.0  # seconds before the spawned processes are killed


def _make_data(cfg: DDPConfig, n: int, seed: int) -> tuple[Any, Any]:
    """Stripes whose orientation is the class (random phase), times a per-sample contrast,
    plus a per-sample offset and pixel noise: the raw statistics vary from sample to sample,
    which is what BN has to absorb, and a conv + global pooling can read the orientation."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.classes, (n,), generator=g)
    angle = labels.double() * math.pi / cfg.classes
    phase = torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi
    coords = torch.arange(cfg.image, dtype=torch.float64)
    u = coords.view(1, -1, 1) * torch.cos(angle).view(-1, 1, 1) + coords.view(1, 1, -1) * torch.sin(
        angle
    ).view(-1, 1, 1)
    stripes = torch.sin(1.5 * u + phase.view(-1, 1, 1)).unsqueeze(1).float()
    contrast = torch.rand(n, 1, 1, 1, generator=g) * 1.5 + 0.5
    offset = torch.randn(n, 1, 1, 1, generator=g) * 2.0
    noise = cfg.noise * torch.randn(n, 1, cfg.image, cfg.image, generator=g)
    return stripes * contrast + offset + noise, labels


def _make_model(cfg: DDPConfig) -> Any:
    import torch
    from torch import nn

    from batchnorm.nn import BatchNorm2d

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, cfg.classes),
    )


def _train_one(rank: int, world: int, cfg: DDPConfig, sync: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    from batchnorm.nn import SyncBatchNorm
    from batchnorm.tools.distribute import bn_running_stats, distribute_bn

    model = _make_model(cfg)
    if sync:
        model = SyncBatchNorm.convert_sync_batchnorm(model)
    # forward_sync_buffers=False: otherwise DDP copies rank 0's running statistics to every
    # rank each step and hides what per-process BN does to them (distribute_bn's job here).
    ddp = DDP(model, forward_sync_buffers=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=cfg.lr, momentum=0.9)
    global_batch = cfg.batch_per_proc * world
    x_all, y_all = _make_data(cfg, cfg.steps * global_batch, seed=cfg.seed + 1)
    losses = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        # rank r takes samples r, r + W, ... of the global batch, as DistributedSampler does
        batch = slice(step * global_batch + rank, (step + 1) * global_batch, world)
        loss = F.cross_entropy(ddp(x_all[batch]), y_all[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds_per_step = (time.perf_counter() - start) / cfg.steps

    def spread() -> float:
        """Largest difference of any BN running statistic between any two ranks."""
        mine = torch.cat([b.reshape(-1) for b in bn_running_stats(model)])
        lo, hi = mine.clone(), mine.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return float((hi - lo).max())

    def accuracy() -> float:
        x_test, y_test = _make_data(cfg, cfg.eval_samples, seed=cfg.seed + 2)
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        model.train()
        return acc

    result = {
        "loss": sum(losses[-20:]) / len(losses[-20:]),
        "spread": spread(),
        "accuracy": accuracy(),
        "ms_per_step": 1000 * seconds_per_step,
    }
    distribute_bn(model, reduce=True)
    result.update(spread_after=spread(), accuracy_after=accuracy())
    return result


def train_worker(rank: int, world: int, config: dict[str, Any]) -> dict[str, Any]:
    """One rank of ``batchnorm ddp``: both models, one after the other, in the same group."""
    cfg = DDPConfig(**config)
    return {
        "local": _train_one(rank, world, cfg, sync=False),
        "sync": _train_one(rank, world, cfg, sync=True),
    }


def _overhead_worker(
    rank: int, world: int, shape: tuple[int, ...], iters: int, dtype: str
) -> dict[str, float]:
    import torch
    import torch.distributed as dist

    from batchnorm.nn import BatchNorm2d, SyncBatchNorm

    torch.manual_seed(rank)
    x = torch.randn(shape, dtype=getattr(torch, dtype), requires_grad=True)
    dy = torch.randn_like(x)
    layers = {"local": BatchNorm2d(shape[1]).to(x.dtype), "sync": SyncBatchNorm(shape[1]).to(x.dtype)}
    samples: dict[str, list[float]] = {name: [] for name in layers}
    # interleaved, so load from other processes on the machine hits both alike;
    # 3 warm-up iterations: kernel loading, SyncBatchNorm's one-time channel check
    for i in range(iters + 3):
        for name, layer in layers.items():
            # start in step, as DDP's gradient all_reduce keeps ranks in training; what is
            # timed is then the layer's own cost, not a peer's head start
            dist.barrier()
            t0 = time.perf_counter()
            layer(x).backward(dy)
            if i >= 3:
                samples[name].append(time.perf_counter() - t0)
    times = {name: 1000 * sorted(s)[len(s) // 2] for name, s in samples.items()}
    return times


def measure_sync_overhead(
    shape: tuple[int, int, int, int] = (16, 64, 32, 32),
    iters: int = 20,
    world_size: int = 2,
    dtype: str = "float32",
    timeout: float = 120.0,
) -> dict[str, Any]:
    """SyncBatchNorm's cost over local BatchNorm2d on ``world_size`` gloo processes.

    Each process times forward + backward of ``batchnorm.nn.BatchNorm2d`` and of
    ``SyncBatchNorm`` on its own ``shape`` (the per-process batch), median of ``iters``
    after 3 warm-up iterations, every iteration started together after a barrier (untimed);
    SyncBatchNorm's time includes waiting for the slower peer inside its collectives.
    Returns ``{"shape", "world_size", "iters", "dtype", "local_ms", "sync_ms",
    "overhead_ms", "ratio"}`` with the times of the slowest rank. For ``batchnorm bench``.

    On this 2-core machine the overhead is almost all collective latency: gloo over
    loopback takes ~0.3 ms per small collective when idle and ~1 ms under load, and
    SyncBatchNorm needs two per forward + backward.
    """
    if len(shape) != 4:
        raise ValueError(f"measure_sync_overhead: shape must be (N, C, H, W) per process, got {shape}")
    per_rank = run_distributed(_overhead_worker, world_size, (tuple(shape), iters, dtype), timeout=timeout)
    local = max(r["local"] for r in per_rank)
    sync = max(r["sync"] for r in per_rank)
    return {
        "shape": tuple(shape),
        "world_size": world_size,
        "iters": iters,
        "dtype": dtype,
        "local_ms": local,
        "sync_ms": sync,
        "overhead_ms": sync - local,
        "ratio": sync / local,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DDPConfig()
    parser.add_argument("--procs", type=int, default=defaults.procs, help="processes (gloo ranks)")
    parser.add_argument(
        "--batch-per-proc", type=int, default=defaults.batch_per_proc, help="samples per process per step"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per model")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data and initialisation seed")
    parser.add_argument("--out", type=Path, default=None, help="write config and results as JSON here")


def run(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    cfg = DDPConfig(
        procs=args.procs, batch_per_proc=args.batch_per_proc, steps=args.steps, lr=args.lr, seed=args.seed
    )
    if cfg.procs < 1 or cfg.batch_per_proc < 1 or cfg.steps < 1:
        raise SystemExit(
            f"batchnorm ddp: --procs, --batch-per-proc and --steps must be >= 1, got "
            f"{cfg.procs}, {cfg.batch_per_proc}, {cfg.steps}"
        )
    console = Console()
    console.print(f"config: {asdict(cfg)}")
    start = time.perf_counter()
    per_rank = run_distributed(train_worker, cfg.procs, (asdict(cfg),), timeout=cfg.timeout)
    table = Table(
        title=f"DDP, {cfg.procs} gloo processes x {cfg.batch_per_proc} samples = global batch "
        f"{cfg.procs * cfg.batch_per_proc}, {cfg.steps} steps"
    )
    for column in (
        "BN",
        "train loss",
        "eval acc: rank 0 (all ranks)",
        "stat spread",
        "after distribute_bn",
        "ms/step",
    ):
        table.add_column(column, justify="right")
    results: dict[str, Any] = {}
    for mode, label in (("local", "per-process"), ("sync", "SyncBatchNorm")):
        ranks = [r[mode] for r in per_rank]
        accs = [r["accuracy"] for r in ranks]
        results[mode] = ranks
        table.add_row(
            label,
            f"{ranks[0]['loss']:.3f}",
            f"{accs[0]:.3f} ({min(accs):.3f}-{max(accs):.3f})",
            f"{ranks[0]['spread']:.2g}",
            f"{ranks[0]['spread_after']:.2g}, acc {ranks[0]['accuracy_after']:.3f}",
            f"{max(r['ms_per_step'] for r in ranks):.1f}",
        )
    console.print(table)
    console.print(
        "Per-process BN normalizes each rank's slice with its own statistics, so the ranks' running "
        "estimates drift apart (spread > 0) and eval depends on the rank until distribute_bn averages "
        "them; SyncBatchNorm normalizes with the global batch and keeps them identical (spread 0)."
    )
    console.print(f"total {time.perf_counter() - start:.1f} s (process start-up included)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": asdict(cfg), "results": results}, indent=2))
        console.print(f"wrote {args.out}")
    return 0
