"""``batchnorm bench --device cuda``: the Triton kernels against torch.nn, and against memory.

For every (shape, layout, dtype) the suite times, with ``torch.cuda.Event`` around each call
and the L2 cache flushed between calls (so a 4 MB tensor is not served from a 50 MB L2):

* training forward and forward+backward through ``batchnorm.functional.batch_norm`` (ours,
  autograd and running-stat update included) and ``torch.nn.functional.batch_norm`` (torch.nn),
  both with ``torch.nn.functional``'s signature, so the harness is the same for both;
* the same through the kernels alone (``kernels.triton.forward_train`` / ``backward``): what the
  Triton code costs without the autograd wrapper;
* the memory-traffic bound: the training forward must read x twice (statistics, then
  normalization) and write y; the backward reads x and dy twice and writes dx::

      bytes_fwd = 3 * size(x),  bytes_fwd_bwd = bytes_fwd + 5 * size(x)
      bound_ms  = bytes / copy_bandwidth

  with the copy bandwidth measured in the same run (``dst.copy_(src)`` of 1 GiB: read + write).

``training_step`` times a whole SGD step of a small ResNet-style CNN with torch.nn's
``BatchNorm2d`` and with ``batchnorm.nn.BatchNorm2d`` (same weights, same input).

Nothing here runs at import: importing needs neither CUDA nor triton. ``device="cpu"`` runs
the same code with a wall-clock timer (the kernels then need ``TRITON_INTERPRET=1``): only a
smoke test of this module, its numbers mean nothing.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

# ResNet-50 (torchvision v1.5) batch-norm inputs at batch 64, one per distinct (C, H, W).
RESNET50_SHAPES: tuple[tuple[int, ...], ...] = (
    (64, 64, 112, 112),
    (64, 64, 56, 56),
    (64, 256, 56, 56),
    (64, 128, 56, 56),
    (64, 128, 28, 28),
    (64, 512, 28, 28),
    (64, 256, 28, 28),
    (64, 256, 14, 14),
    (64, 1024, 14, 14),
    (64, 512, 14, 14),
    (64, 512, 7, 7),
    (64, 2048, 7, 7),
)
# A wide fully connected BN, and the first BN of an ImageNet network (3 channels: the split
# reduction's hardest case).
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = RESNET50_SHAPES + ((8192, 1024), (256, 3, 224, 224))
DEFAULT_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
TRAFFIC_FWD = 3  # passes over x's bytes: read x (stats), read x + write y (normalize)
TRAFFIC_BWD = 5  # read x, dy (sums); read x, dy + write dx
EPS = 1e-5


class _Timer:
    """Median milliseconds of ``fn()``: CUDA events around each call, L2 flushed in between."""

    def __init__(self, device: Any, flush_bytes: int = 256 << 20) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(flush_bytes // 4 if self.cuda else 1, device=device)

    def __call__(self, fn: Callable[[], Any], repeats: int) -> float:
        for _ in range(3 if self.cuda else 1):  # compile, autotune, allocator warm-up
            fn()
        times = []
        for _ in range(repeats):
            self.flush.zero_()
            if self.cuda:
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: Any = "cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in GB/s from ``dst.copy_(src)`` (``2 * nbytes`` moved per copy)."""
    import torch

    device = torch.device(device)
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _Timer(device, flush_bytes=4)(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def traffic_bound_ms(nbytes: int, bandwidth_gbs: float, passes: int) -> float:
    """Time to move ``passes * nbytes`` at ``bandwidth_gbs``: no BN kernel can beat it."""
    return passes * nbytes / (bandwidth_gbs * 1e9) * 1e3


def layouts_for(shape: Sequence[int]) -> tuple[str, ...]:
    """``nc`` for 2-D inputs; NCHW and channels-last for images."""
    return ("nc",) if len(shape) == 2 else ("nchw", "nhwc")


def _make_input(shape: Sequence[int], layout: str, dtype: Any, device: Any):
    import torch

    x = torch.randn(tuple(shape), device=device, dtype=torch.float32).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _bench_one(
    shape, layout: str, dtype_name: str, device, timer: _Timer, bandwidth: float, repeats: int
) -> dict:
    import torch
    import torch.nn.functional as F

    from batchnorm import functional as ours_f
    from batchnorm.kernels import triton as tk

    dtype = getattr(torch, dtype_name)
    c = shape[1]
    x = _make_input(shape, layout, dtype, device)
    dy = torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    row: dict[str, Any] = {
        "shape": "x".join(map(str, shape)), "layout": layout, "dtype": dtype_name,
        "mbytes": round(nbytes / 1e6, 2),
    }  # fmt: skip

    def module_step(fn, backward: bool) -> Callable[[], Any]:
        w = torch.ones(c, device=device, requires_grad=True)
        b = torch.zeros(c, device=device, requires_grad=True)
        rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
        xr = x.detach().requires_grad_(backward)

        def step():
            y = fn(xr, rm, rv, w, b, training=True, momentum=0.1, eps=EPS)
            if backward:
                y.backward(dy)

        return step

    w, b = torch.ones(c, device=device), torch.zeros(c, device=device)

    def kernels_fwd():
        return tk.forward_train(x, w, b, EPS)

    def kernels_fwd_bwd():
        _, mean, _, invstd = tk.forward_train(x, w, b, EPS)
        return tk.backward(dy, x, mean, invstd, w)

    for name, fn in (
        ("torch_fwd_ms", module_step(F.batch_norm, False)),
        ("torch_fwd_bwd_ms", module_step(F.batch_norm, True)),
        ("ours_fwd_ms", module_step(ours_f.batch_norm, False)),
        ("ours_fwd_bwd_ms", module_step(ours_f.batch_norm, True)),
        ("kernels_fwd_ms", kernels_fwd),
        ("kernels_fwd_bwd_ms", kernels_fwd_bwd),
    ):
        try:
            row[name] = timer(fn, repeats)
        except Exception as exc:  # one broken path must not hide the rest of the table
            row[name] = float("nan")
            row.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
    row["bound_fwd_ms"] = traffic_bound_ms(nbytes, bandwidth, TRAFFIC_FWD)
    row["bound_fwd_bwd_ms"] = traffic_bound_ms(nbytes, bandwidth, TRAFFIC_FWD + TRAFFIC_BWD)
    for who in ("torch", "ours", "kernels"):
        row[f"{who}_fwd_bound_pct"] = 100 * row["bound_fwd_ms"] / row[f"{who}_fwd_ms"]
        row[f"{who}_fwd_bwd_bound_pct"] = 100 * row["bound_fwd_bwd_ms"] / row[f"{who}_fwd_bwd_ms"]
    row["speedup_fwd"] = row["torch_fwd_ms"] / row["ours_fwd_ms"]
    row["speedup_fwd_bwd"] = row["torch_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"]
    return row


def run_cuda_suite(
    shapes: Sequence[Sequence[int]] | None = None,
    dtypes: Sequence[str] = DEFAULT_DTYPES,
    repeats: int = 20,
    device: str = "cuda",
    bandwidth_bytes: int = 1 << 30,
) -> list[dict]:
    """One row per (shape, layout, dtype): ours vs torch.nn, in ms and in % of the traffic bound.

    Every row also carries ``copy_gbs``, the bandwidth the bound was computed from. Timing
    errors of one path are reported in the row's ``errors`` list, with NaN times.
    """
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "device: expected a CUDA device for the GPU suite, but torch.cuda.is_available() is False; "
            "run `batchnorm bench` without --device cuda for the CPU suite"
        )
    shapes = DEFAULT_SHAPES if shapes is None else shapes
    bandwidth = copy_bandwidth(dev, bandwidth_bytes)
    timer = _Timer(dev, flush_bytes=(256 << 20) if dev.type == "cuda" else 4)
    rows = []
    for shape in shapes:
        for layout in layouts_for(shape):
            for dtype_name in dtypes:
                row = _bench_one(tuple(shape), layout, dtype_name, dev, timer, bandwidth, repeats)
                row["copy_gbs"] = round(bandwidth, 1)
                rows.append(row)
    return rows


def geometric_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, finite)) / len(finite)) if finite else float("nan")


def summarize(rows: Sequence[dict], min_mbytes: float = 16.0) -> dict:
    """The issue's targets: bound fraction on shapes >= 16 MB, geometric-mean speedup, slowest shape."""
    big = [r for r in rows if r["mbytes"] >= min_mbytes]
    return {
        "min_fwd_bound_pct_16mb": min((r["ours_fwd_bound_pct"] for r in big), default=float("nan")),
        "min_fwd_bwd_bound_pct_16mb": min((r["ours_fwd_bwd_bound_pct"] for r in big), default=float("nan")),
        "geomean_speedup_fwd_bwd": geometric_mean([r["speedup_fwd_bwd"] for r in rows]),
        "min_speedup_fwd_bwd": min((r["speedup_fwd_bwd"] for r in rows), default=float("nan")),
    }


def small_resnet(bn: Callable[[int], Any], width: int = 64, num_classes: int = 10):
    """A CIFAR-style ResNet (stem + 4 stages of 2 basic blocks) with ``bn(channels)`` layers."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = bn(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = bn(cout)
            self.short = nn.Sequential()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.short(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), bn(width), nn.ReLU()]
    cin = width
    for i, mult in enumerate((1, 2, 4, 8)):
        cout = width * mult
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def training_step(
    batch: int = 128, image: int = 32, width: int = 64, dtype: str = "float32", channels_last: bool = False,
    repeats: int = 20, device: str = "cuda",
) -> dict:  # fmt: skip
    """ms per SGD step of ``small_resnet`` with torch.nn.BatchNorm2d vs batchnorm.nn.BatchNorm2d.

    ``dtype="bfloat16"`` runs under ``torch.autocast``; both models start from the same weights.
    """
    import torch

    import batchnorm.nn as bnn

    dev = torch.device(device)
    x = torch.randn(batch, 3, image, image, device=dev)
    target = torch.randint(0, 10, (batch,), device=dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    torch.manual_seed(0)
    reference_model = small_resnet(torch.nn.BatchNorm2d, width).to(dev, memory_format=fmt)
    row: dict[str, Any] = {"model": f"resnet-18-style w{width}", "batch": batch, "image": image,
                           "dtype": dtype, "channels_last": channels_last}  # fmt: skip
    timer = _Timer(dev, flush_bytes=4)
    for name, bn in (("torch_step_ms", torch.nn.BatchNorm2d), ("ours_step_ms", bnn.BatchNorm2d)):
        model = small_resnet(bn, width).to(dev, memory_format=fmt)
        model.load_state_dict(reference_model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        try:
            row[name] = timer(step, repeats)
        except Exception as exc:
            row[name] = float("nan")
            row.setdefault("errors", []).append(f"{name}: {type(exc).__name__}: {exc}")
    row["speedup"] = row["torch_step_ms"] / row["ours_step_ms"]
    return row


COLUMNS = (
    "shape", "layout", "dtype", "mbytes", "torch_fwd_ms", "ours_fwd_ms", "kernels_fwd_ms", "bound_fwd_ms",
    "torch_fwd_bound_pct", "ours_fwd_bound_pct", "torch_fwd_bwd_ms", "ours_fwd_bwd_ms", "kernels_fwd_bwd_ms",
    "bound_fwd_bwd_ms", "torch_fwd_bwd_bound_pct", "ours_fwd_bwd_bound_pct", "speedup_fwd_bwd",
)  # fmt: skip


def to_markdown(rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> str:
    """A markdown table of ``rows`` (numbers to 3 significant digits), for docs/benchmarks.md."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
