"""batchnorm.bench.gpu: importable without CUDA; its whole code path smoke-tested on CPU.

On CPU the kernels run in Triton's interpreter and the timer is wall-clock, so only the
structure of the results is checked, and the arithmetic of the bound.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from batchnorm.bench import gpu as bench_gpu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_traffic_bound_arithmetic():
    # 1 GB at 1000 GB/s is 1 ms per pass
    assert bench_gpu.traffic_bound_ms(10**9, 1000.0, 3) == pytest.approx(3.0)
    assert bench_gpu.TRAFFIC_FWD + bench_gpu.TRAFFIC_BWD == 8
    assert bench_gpu.geometric_mean([2.0, 8.0, float("nan")]) == pytest.approx(4.0)


def test_default_suite_covers_the_issue_shapes():
    shapes = bench_gpu.DEFAULT_SHAPES
    assert (64, 2048, 7, 7) in shapes and (8192, 1024) in shapes and (256, 3, 224, 224) in shapes
    assert bench_gpu.layouts_for((8192, 1024)) == ("nc",)
    assert bench_gpu.layouts_for((64, 64, 56, 56)) == ("nchw", "nhwc")


def test_suite_rows_and_table():
    rows = bench_gpu.run_cuda_suite(
        shapes=[(4, 3, 5, 5), (8, 4)], dtypes=("float32",), repeats=1, device=DEVICE, bandwidth_bytes=1 << 20
    )
    assert [(r["layout"], r["dtype"]) for r in rows] == [
        ("nchw", "float32"),
        ("nhwc", "float32"),
        ("nc", "float32"),
    ]
    for r in rows:
        assert "errors" not in r, r.get("errors")
        assert all(r[k] > 0 and math.isfinite(r[k]) for k in bench_gpu.COLUMNS if k.endswith("_ms"))
        assert r["bound_fwd_bwd_ms"] == pytest.approx(8 / 3 * r["bound_fwd_ms"])
    summary = bench_gpu.summarize(rows, min_mbytes=0)
    assert summary["geomean_speedup_fwd_bwd"] > 0
    table = bench_gpu.to_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "4x3x5x5" in table


def test_training_step_runs_both_models():
    row = bench_gpu.training_step(batch=4, image=8, width=4, repeats=1, device=DEVICE)
    assert "errors" not in row, row.get("errors")
    assert row["torch_step_ms"] > 0 and row["ours_step_ms"] > 0
