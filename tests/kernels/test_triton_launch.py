"""The direct-launch cache: its key is at least as fine as Triton's specialization, hooks and
the interpreter take Triton's own path, and on a GPU a cached launch computes what ``run`` does."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from batchnorm.kernels.triton import _launch  # noqa: E402
from batchnorm.kernels.triton import forward as fwd  # noqa: E402


def test_key_separates_what_triton_specializes_on():
    base = torch.zeros(64)
    assert _launch._spec(base) != _launch._spec(base[1:])  # 16-byte alignment
    assert _launch._spec(base) != _launch._spec(base.double())  # pointer dtype
    assert _launch._spec(base) == _launch._spec(torch.ones(64))
    # 1 | 2 and 17 | 16 and 32 (divisible by 16) | 2**31 (64-bit)
    assert len({_launch._spec(v) for v in (1, 2, 16, 32, 2**31, 17)}) == 4
    assert _launch._spec(0.5) == _launch._spec(1e-5) != _launch._spec(1)


def test_interpreter_and_hooks_take_tritons_run(monkeypatch):
    if DEVICE == "cpu":
        assert not _launch._ENABLED
    assert _launch._hooks_idle()
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda metadata: None)
    assert not _launch._hooks_idle()


@pytest.mark.skipif(DEVICE == "cpu", reason="needs a CUDA device (the interpreter has no compiled kernels)")
def test_cached_launch_computes_what_run_computes():
    x = torch.randn(4, 3, 50, device=DEVICE)
    mean, invstd = torch.randn(3, device=DEVICE), torch.rand(3, device=DEVICE) + 0.5
    consts = dict(HAS_WEIGHT=False, HAS_BIAS=False, ACT=0, BLOCK_N=4, BLOCK_S=64, ACC=triton.language.float32,
                  FROM_PARTIALS=False, BLOCK_K=1, UPDATE_RUNNING=False)  # fmt: skip
    outputs = []
    before = len(_launch._COMPILED)
    for _ in range(3):  # compile + cache, then two cached launches
        y = torch.empty_like(x)
        args = (x, y, mean, invstd, x, x, 0.0, 4, 3, 50, 1, x, x, x, x, 0.0, 0.0, x, x, 0.0, 0.0)
        _launch.launch(fwd.normalize_ncs_kernel, (3,), args, 4, **consts)
        outputs.append(y)
    assert len(_launch._COMPILED) == before + 1
    expected = (x - mean[:, None]) * invstd[:, None]
    for y in outputs:
        torch.testing.assert_close(y, expected)
