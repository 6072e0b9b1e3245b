"""Start-up cost: import plus first call in a fresh process, cold and warm.

``cold``: ``NUMBA_CACHE_DIR`` points to an empty temporary directory, so every kernel the
first call needs is compiled (the first run after installation). ``warm``: a second process
with the same directory (compiled kernels loaded from the cache, a user's later runs). Each
process also times a call on a second shape of the same layout: with the cache working and
shape-generic kernels this costs milliseconds, not a recompilation.

Before importing batchnorm, each process makes the same call with torch.nn's module
(``torch_first_call_s``): torch's own first backward imports sympy and its symbolic-shapes
machinery (~0.5 s here), a cost every PyTorch program pays once whichever batch norm it
uses. Timing it first keeps it out of batchnorm's figures, which are batchnorm's import
plus its first call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# layout -> (module class name, first shape, second shape, channels-last?)
LAYOUTS = {
    "nchw": ("BatchNorm2d", (16, 32, 28, 28), (8, 32, 14, 14), False),
    "channels-last": ("BatchNorm2d", (16, 32, 28, 28), (8, 32, 14, 14), True),
    "(N, C)": ("BatchNorm1d", (256, 64), (128, 64), False),
    "nchw, BatchNormAct2d": ("BatchNormAct2d", (16, 32, 28, 28), (8, 32, 14, 14), False),
}

_PROBE = """
import json, sys, time
start = time.perf_counter()
import torch
t_torch = time.perf_counter()
cls_name, shape1, shape2, cl = json.loads(sys.argv[1])

def call(cls, shape):
    x = torch.randn(shape)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    m = cls(shape[1])
    y = m(x)
    y.backward(torch.ones_like(y))
    with torch.no_grad():
        m.eval()(x)

call(torch.nn.BatchNorm1d if len(shape1) == 2 else torch.nn.BatchNorm2d, shape1)
t_torch_call = time.perf_counter()
import batchnorm.nn
cls = getattr(batchnorm.nn, cls_name)
t_import = time.perf_counter()
call(cls, shape1)
t_first = time.perf_counter()
call(cls, shape2)
t_second = time.perf_counter()
print(json.dumps({"torch_import_s": t_torch - start, "torch_first_call_s": t_torch_call - t_torch,
                  "batchnorm_import_s": t_import - t_torch_call, "first_call_s": t_first - t_import,
                  "second_shape_s": t_second - t_first}))
"""


def probe(layout: str, cache_dir: str, timeout: float = 300.0) -> dict:
    """One fresh interpreter: import, first call (train fwd+bwd and eval), a second shape."""
    cls_name, shape1, shape2, cl = LAYOUTS[layout]
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps([cls_name, shape1, shape2, cl])],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"start-up probe for {layout} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def startup_rows(layouts: tuple[str, ...] = tuple(LAYOUTS)) -> list[dict]:
    """Per layout: cold and warm import + first call, with a fresh cache directory per layout."""
    rows = []
    for layout in layouts:
        with tempfile.TemporaryDirectory(prefix="batchnorm-numba-cache-") as cache_dir:
            for state in ("cold", "warm"):
                r = probe(layout, cache_dir)
                rows.append(
                    {
                        "layout": layout,
                        "cache": state,
                        "import_torch_s": round(r["torch_import_s"], 3),
                        "torch_nn_first_call_s": round(r["torch_first_call_s"], 3),
                        "import_batchnorm_s": round(r["batchnorm_import_s"], 3),
                        "first_call_s": round(r["first_call_s"], 3),
                        "batchnorm_import_plus_first_call_s": round(
                            r["batchnorm_import_s"] + r["first_call_s"], 3
                        ),
                        "second_shape_s": round(r["second_shape_s"], 4),
                    }
                )
    return rows
