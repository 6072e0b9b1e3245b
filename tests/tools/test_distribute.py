"""distribute_bn: average or broadcast BN running statistics across 2 gloo processes (one spawn)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()


def _model(rank: int) -> torch.nn.Module:
    from batchnorm.nn import BatchNorm1d, GhostBatchNorm2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(3),
        torch.nn.Sequential(BatchNorm1d(4), torch.nn.BatchNorm1d(2, track_running_stats=False)),
        GhostBatchNorm2d(5, virtual_batch_size=2).double(),  # a second dtype: a second flat buffer
        torch.nn.Linear(2, 2),
    )
    # rank-dependent statistics, as per-process BN leaves them
    for i, b in enumerate(_stats(model)):
        b.copy_(torch.arange(b.numel(), dtype=b.dtype) * (rank + 1) + 10 * i + 1)
    return model


def _stats(model):
    from batchnorm.tools.distribute import bn_running_stats

    return bn_running_stats(model)


def distribute_worker(rank: int, world: int) -> dict:
    from batchnorm import distribute_bn

    out = {}
    for reduce in (True, False):
        model = _model(rank)
        tracked = [
            int(m.num_batches_tracked)
            for m in model.modules()
            if hasattr(m, "num_batches_tracked") and m.num_batches_tracked is not None
        ]
        # DDP-wrapped models are accepted; init_sync=False: DDP would otherwise broadcast rank 0's buffers
        wrapped = torch.nn.parallel.DistributedDataParallel(model, init_sync=False)
        assert distribute_bn(wrapped, reduce=reduce) is wrapped
        out[reduce] = [b.tolist() for b in _stats(model)]
        out[f"tracked_{reduce}"] = tracked == [
            int(m.num_batches_tracked)
            for m in model.modules()
            if hasattr(m, "num_batches_tracked") and m.num_batches_tracked is not None
        ]
    return out


@pytest.fixture(scope="module")
def spawned():
    from batchnorm.lab.ddp import run_distributed

    return run_distributed(f"{HERE}:distribute_worker", 2, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("reduce", [True, False])
def test_every_rank_agrees(spawned, reduce):
    per_rank = [[_stats(_model(r))[i] for i in range(6)] for r in range(2)]  # before, rebuilt here
    for i, buffers in enumerate(zip(*per_rank, strict=True)):
        expected = (buffers[0] + buffers[1]) / 2 if reduce else buffers[0]
        for r in range(2):
            torch.testing.assert_close(torch.tensor(spawned[r][reduce][i], dtype=expected.dtype), expected)
    assert all(spawned[r][f"tracked_{reduce}"] for r in range(2))


def test_bn_running_stats_finds_every_tracked_buffer():
    model = _model(0)
    # BatchNorm2d, BatchNorm1d, GhostBatchNorm2d: mean and var each; the untracked one has none
    assert [b.numel() for b in _stats(model)] == [3, 3, 4, 4, 5, 5]


def test_without_process_group_is_a_no_op():
    from batchnorm import distribute_bn

    model = _model(1)
    before = [b.clone() for b in _stats(model)]
    assert distribute_bn(model) is model
    assert all(torch.equal(a, b) for a, b in zip(before, _stats(model), strict=True))


def test_bad_arguments():
    from batchnorm import distribute_bn

    with pytest.raises(TypeError, match="model"):
        distribute_bn("not a model")
    with pytest.raises(TypeError, match="reduce"):
        distribute_bn(torch.nn.BatchNorm1d(2), reduce="mean")
