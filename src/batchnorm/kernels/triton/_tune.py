"""Optional autotuning of the launch configuration, on a GPU, per input geometry.

``LaunchConfig()``'s defaults are reasoned, not measured (see ``_dispatch``). With
``BATCHNORM_TRITON_AUTOTUNE=1`` the first call on a new ``(layout, N or R, C, S, dtype)`` times
every candidate below on that input (training forward, then backward, with
``triton.testing.do_bench``) and keeps the fastest for the rest of the process. The split factor
changes the size of the partial buffers, so Triton's own ``@triton.autotune`` (which keeps the
grid and the arguments) does not fit; this does the same on the level of the launches.

Never active on CPU tensors: in the interpreter it would only make the tests slow.
"""

from __future__ import annotations

import os
from itertools import product

import torch

CANDIDATES = tuple(
    {"tile_bytes": tile, "programs_per_sm": per_sm}
    for tile, per_sm in product((4096, 8192, 16384), (4, 8, 16))
)

_CACHE: dict[tuple, object] = {}


def enabled(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and os.environ.get("BATCHNORM_TRITON_AUTOTUNE", "0") not in ("", "0")


def best_config(view, default):
    """The fastest candidate for ``view`` (a ``_dispatch._View``), measured once and cached."""
    from dataclasses import replace

    import triton.testing

    from batchnorm.kernels.triton import _dispatch as d

    x = view.x
    key = (view.layout, view.n, view.c, view.s, x.dtype, x.device.index)
    if key in _CACHE:
        return _CACHE[key]
    dy = torch.randn_like(x)

    def step(cfg):
        _, mean, _, invstd = d._forward_act(view, None, None, 1e-5, 0, 0.0, cfg)
        d._backward_act(view, dy, mean, invstd, None, None, 0, 0.0, False, cfg)

    timings = {}
    for cand in CANDIDATES:
        cfg = replace(default, **cand)
        timings[cfg] = triton.testing.do_bench(lambda cfg=cfg: step(cfg), warmup=5, rep=20)
    _CACHE[key] = min(timings, key=timings.get)
    return _CACHE[key]
