"""SyncBatchNorm: 2 and 3 gloo processes against single-process BatchNorm on the whole batch.

ONE spawn of 3 processes (``run_distributed``) runs every case and returns error figures; the
2-process cases run on a subgroup of ranks {0, 1} (which also exercises ``process_group``).
The tests below read the figures. The worker is loaded in the children from this
file's path, so it must stay importable without pytest's help.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference

HERE = Path(__file__).resolve()

# name -> (local batch sizes, trailing shape, dtype, channels_last, affine, momentum)
CASES_2 = {
    "even": ([4, 4], (3, 4, 5), "float64", False, True, 0.1),
    "uneven": ([3, 6], (3, 4, 5), "float64", False, True, 0.1),
    "empty": ([0, 5], (3, 4, 5), "float64", False, True, 0.1),
    "channels_last": ([3, 4], (3, 4, 5), "float64", True, True, 0.1),
    "float32": ([4, 5], (3, 4, 5), "float32", False, True, 0.1),
    "no_affine_cma": ([2, 3], (3, 4, 5), "float64", False, False, None),
    "flat_1d": ([5, 2], (6,), "float64", False, True, 0.1),
}
CASES_3 = {
    "even": ([3, 3, 3], (3, 4, 5), "float64", False, True, 0.1),
    "uneven": ([1, 4, 2], (3, 4, 5), "float64", False, True, 0.1),
    "empty": ([2, 0, 5], (3, 4, 5), "float64", False, True, 0.1),
}
# SyncBatchNormAct on ranks {0, 1} against BatchNormAct on the whole batch:
# name -> (local batch sizes, trailing shape, dtype, channels_last, affine, momentum, (act, save_memory))
CASES_ACT = {
    "relu_uneven": ([3, 6], (3, 4, 5), "float64", False, True, 0.1, ("relu", False)),
    "leaky_save_memory": ([4, 4], (3, 4, 5), "float64", False, True, 0.1, ("leaky_relu", True)),
    "silu_channels_last_f32": ([3, 4], (3, 4, 5), "float32", True, True, 0.1, ("silu", False)),
    "identity_save_memory_empty": ([0, 5], (3, 4, 5), "float64", False, False, None, ("identity", True)),
    "leaky_flat_1d": ([5, 2], (6,), "float64", False, True, 0.1, ("leaky_relu", False)),
}
STEPS = 2


def _count_collectives(counter: dict[str, int]) -> None:
    import torch.distributed as dist

    for name in ("all_gather", "all_reduce", "broadcast", "all_gather_into_tensor", "reduce_scatter"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            counter["n"] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def _count_calls(*names: str) -> dict[str, int]:
    """Count calls of batchnorm.nn.act's kernel entry points (proves the fused route is taken)."""
    from batchnorm.nn import act as act_ops

    calls = dict.fromkeys(names, 0)
    for name in names:
        original = getattr(act_ops, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(act_ops, name, counted)
    return calls


def _run_case(rank, group, sizes, trailing, dtype_name, channels_last, affine, momentum, counter, act=None):
    import torch.distributed as dist

    from batchnorm.nn import BatchNormAct1d, BatchNormAct2d, SyncBatchNorm, SyncBatchNormAct

    dtype = getattr(torch, dtype_name)
    c = trailing[0]
    n = sum(sizes)
    start = sum(sizes[:rank])
    if act is None:
        sync = SyncBatchNorm(c, affine=affine, momentum=momentum, process_group=group).to(dtype)
        ref = (torch.nn.BatchNorm2d if len(trailing) == 3 else torch.nn.BatchNorm1d)(
            c, affine=affine, momentum=momentum
        ).to(torch.float64)
    else:
        # the fused reference: BatchNormAct on the whole batch (itself tested against torch)
        kwargs = dict(affine=affine, momentum=momentum, act=act[0], negative_slope=0.2, save_memory=act[1])
        sync = SyncBatchNormAct(c, process_group=group, **kwargs).to(dtype)
        ref = (BatchNormAct2d if len(trailing) == 3 else BatchNormAct1d)(c, **kwargs).to(torch.float64)
    if affine:
        with torch.no_grad():
            sync.weight.copy_(torch.linspace(0.5, 1.5, c))
            sync.bias.copy_(torch.linspace(-1, 1, c))
            ref.weight.copy_(sync.weight)
            ref.bias.copy_(sync.bias)
    out: dict[str, float] = {"y": 0.0, "dx": 0.0, "dw": 0.0, "db": 0.0}
    calls = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(100 * step + 7)
        x_all = torch.randn((n, *trailing), generator=g, dtype=torch.float64) * 3 + 5
        up_all = torch.randn((n, *trailing), generator=g, dtype=torch.float64)
        x = x_all[start : start + sizes[rank]].to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        counter["n"] = 0
        y = sync(x)
        calls.append(counter["n"])
        counter["n"] = 0
        (y * up_all[start : start + sizes[rank]].to(dtype)).sum().backward()
        calls.append(counter["n"])
        x_ref = x_all.clone().requires_grad_()
        y_ref = ref(x_ref)
        (y_ref * up_all).sum().backward()
        mine = slice(start, start + sizes[rank])
        assert y.shape == x.shape and x.grad.shape == x.shape
        if channels_last and sizes[rank]:
            out["layout_kept"] = float(y.is_contiguous(memory_format=torch.channels_last))
        out["y"] = max(out["y"], (y.double() - y_ref[mine]).abs().max().item() if y.numel() else 0.0)
        out["dx"] = max(
            out["dx"], (x.grad.double() - x_ref.grad[mine]).abs().max().item() if y.numel() else 0.0
        )
        if affine:
            grads = torch.cat([sync.weight.grad, sync.bias.grad]).double()
            dist.all_reduce(
                grads, group=group
            )  # DDP's job: the per-rank shares must sum to the global gradient
            out["dw"] = max(out["dw"], (grads[:c] - ref.weight.grad).abs().max().item())
            out["db"] = max(out["db"], (grads[c:] - ref.bias.grad).abs().max().item())
            sync.weight.grad = sync.bias.grad = None
            ref.weight.grad = ref.bias.grad = None
    out["running_mean"] = (sync.running_mean.double() - ref.running_mean).abs().max().item()
    out["running_var"] = (sync.running_var.double() - ref.running_var).abs().max().item()
    out["tracked"] = int(sync.num_batches_tracked)
    out["calls"] = calls
    out["stats"] = torch.cat([sync.running_mean, sync.running_var]).double().tolist()
    # eval: running statistics, no communication
    sync.eval()
    ref.eval()
    x = torch.randn((3, *trailing), dtype=torch.float64)
    counter["n"] = 0
    out["eval"] = (sync(x.to(dtype)).double() - ref(x)).abs().max().item()
    out["eval_calls"] = counter["n"]
    return out


def _bias_only_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = (4, 2, 5)  # uneven local batches
    x = torch.randn(sizes[rank], 3, 2, generator=gen, dtype=torch.float64) * 2 + 1
    return x, torch.randn(x.shape, generator=gen, dtype=torch.float64)


def _bias_only_case(rank: int) -> dict:
    """weight=None with a bias over the whole world: y, dx and this rank's bias gradient."""
    import torch.distributed as dist

    from batchnorm.nn.sync import sync_batch_norm

    x, dy = _bias_only_inputs(rank)
    x.requires_grad_()
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = sync_batch_norm(x, None, None, None, bias, True, 0.1, 1e-5, process_group=dist.group.WORLD)
    y.backward(dy)
    return {"y": y.detach().tolist(), "dx": x.grad.tolist(), "db": bias.grad.tolist()}


def sync_worker(rank: int, world: int) -> dict:
    """Runs in every spawned process; returns per-case figures (plain Python values)."""
    import torch.distributed as dist

    from batchnorm.nn import SyncBatchNorm

    counter = {"n": 0}
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    _count_collectives(counter)
    results: dict = {"2": {}, "3": {}}
    if rank < 2:
        results["2"] = {name: _run_case(rank, pair, *case, counter) for name, case in CASES_2.items()}
        fused = _count_calls("backward_reduce_act", "backward_dx_act", "normalize_act")
        results["act"] = {
            name: _run_case(rank, pair, *case[:6], counter, case[6]) for name, case in CASES_ACT.items()
        }
        results["act_fused_calls"] = dict(fused)
    results["3"] = {name: _run_case(rank, None, *case, counter) for name, case in CASES_3.items()}
    results["bias_only"] = _bias_only_case(rank)
    # a global batch of one value per channel: every rank raises, the group stays usable
    try:
        SyncBatchNorm(3)(torch.randn(1 if rank == 0 else 0, 3))
        results["too_small"] = "no error"
    except ValueError as e:
        results["too_small"] = str(e)
    # ranks that disagree on the channel count
    try:
        SyncBatchNorm(3 + rank)(torch.randn(4, 3 + rank, 2))
        results["mismatch"] = "no error"
    except ValueError as e:
        results["mismatch"] = str(e)
    return results


@pytest.fixture(scope="module")
def spawned() -> list[dict]:
    from batchnorm.lab.ddp import run_distributed

    return run_distributed(f"{HERE}:sync_worker", 3, timeout=150)


def _check(results: list[dict], name: str, dtype: str) -> None:
    tol = 1e-10 if dtype == "float64" else 1e-4  # float32: values are O(1-10), ~1e-5 relative
    for rank, r in enumerate(results):
        case = r[name]
        for key in ("y", "dx", "dw", "db", "running_mean", "running_var", "eval"):
            assert case[key] < tol, (rank, key, case[key])
        assert case["tracked"] == STEPS
        # per step [forward, backward]: one all_gather in forward (plus the one-time channel
        # check on the first), one all_reduce in backward
        assert case["calls"] == [2, 1] + [1, 1] * (STEPS - 1), case["calls"]
        assert case["eval_calls"] == 0
        if "layout_kept" in case:
            assert case["layout_kept"] == 1.0
    # running statistics are bitwise identical on every rank
    assert all(r[name]["stats"] == results[0][name]["stats"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_2))
def test_two_processes(spawned, name):
    _check([r["2"] for r in spawned[:2]], name, CASES_2[name][2])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_ACT))
def test_two_processes_fused_act(spawned, name):
    """SyncBatchNormAct (fused, save_memory kept) equals BatchNormAct on the global batch,
    with the same one collective per pass as SyncBatchNorm."""
    _check([r["act"] for r in spawned[:2]], name, CASES_ACT[name][2])
    # rank 1 is never empty: every training step ran the fused kernels (eval runs normalize_act too)
    calls = spawned[1]["act_fused_calls"]
    steps = len(CASES_ACT) * STEPS
    assert calls["backward_reduce_act"] == calls["backward_dx_act"] == steps, calls
    assert calls["normalize_act"] >= steps, calls


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES_3))
def test_three_processes(spawned, name):
    _check([r["3"] for r in spawned], name, CASES_3[name][2])


@pytest.mark.slow
def test_bias_without_weight_matches_single_process(spawned):
    inputs = [_bias_only_inputs(rank) for rank in range(3)]
    x = torch.cat([x for x, _ in inputs]).requires_grad_()
    bias = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, None, None, None, bias, training=True)
    y.backward(torch.cat([dy for _, dy in inputs]))
    start = 0
    for rank, r in enumerate(spawned):
        n, ours = inputs[rank][0].shape[0], r["bias_only"]
        rows = slice(start, start + n)
        for key, expected in (("y", y[rows].detach()), ("dx", x.grad[rows])):
            got = torch.tensor(ours[key], dtype=torch.float64)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
        start += n
    summed = sum(torch.tensor(r["bias_only"]["db"], dtype=torch.float64) for r in spawned)
    torch.testing.assert_close(summed, bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_global_batch_of_one_value_raises_on_every_rank(spawned):
    for r in spawned:
        assert "more than 1 value per channel" in r["too_small"]


@pytest.mark.slow
def test_channel_mismatch_is_a_clear_error(spawned):
    for r in spawned:
        assert "disagree on the channel count" in r["mismatch"] and "[3, 4, 5]" in r["mismatch"]


def test_without_process_group_is_batchnorm_and_warns_once():
    from batchnorm.nn import SyncBatchNorm
    from batchnorm.nn import sync as sync_module

    sync_module._warned_no_group = False
    m = SyncBatchNorm(3).double()
    ref = torch.nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64) * 2 + 1
    with pytest.warns(UserWarning, match="no torch.distributed process group"):
        y = m(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = m(x)  # second call: silent
    ref(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_convert_round_trip_keeps_state_and_activation():
    from batchnorm.nn import BatchNormAct2d, GhostBatchNorm2d, SyncBatchNorm
    from batchnorm.nn.sync_act import SyncBatchNormAct

    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2),
        GhostBatchNorm2d(4, virtual_batch_size=2),
        torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False)),
    )
    model(torch.randn(6, 2, 5, 5))  # non-trivial running statistics
    model.eval()
    x = torch.randn(3, 2, 5, 5)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNorm and converted[1].weight is weight  # shared, not copied
    assert isinstance(converted[1], torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(converted[1], torch.nn.SyncBatchNorm)  # DDP on CPU refuses those
    assert type(converted[2]) is SyncBatchNormAct and converted[2].act == "leaky_relu"
    assert converted[2].negative_slope == 0.2
    assert type(converted[3]) is GhostBatchNorm2d  # local by design: left alone
    assert type(converted[4][0]) is SyncBatchNorm and not converted[4][0].training
    assert set(converted.state_dict()) == set(state)
    torch.testing.assert_close(converted(x), before)  # eval without any process group
    # and back: the converted model's state loads into the original architecture
    fresh = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2),
        GhostBatchNorm2d(4, virtual_batch_size=2),
        torch.nn.Sequential(torch.nn.BatchNorm2d(4, affine=False)),
    )
    fresh.load_state_dict(converted.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), before)


def test_convert_keeps_save_memory_and_fused_result():
    from batchnorm.nn import BatchNormAct2d, SyncBatchNorm
    from batchnorm.nn import sync as sync_module
    from batchnorm.nn.sync_act import SyncBatchNormAct

    sync_module._warned_no_group = True
    original = BatchNormAct2d(3, act="leaky_relu", negative_slope=0.1, save_memory=True).double()
    copy = BatchNormAct2d(3, act="leaky_relu", negative_slope=0.1, save_memory=True).double()
    converted = SyncBatchNorm.convert_sync_batchnorm(copy)
    assert (
        type(converted) is SyncBatchNormAct
        and converted.save_memory
        and "save_memory=True" in repr(converted)
    )
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 1
    dy = torch.randn_like(x)
    for m in (original, converted):
        xg = x.clone().requires_grad_()
        m(xg).backward(dy)
        m.grad_x = xg.grad
    torch.testing.assert_close(converted.grad_x, original.grad_x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(converted.running_var, original.running_var, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="save_memory"):
        SyncBatchNormAct(3, act="silu", save_memory=True)
    with pytest.raises(ValueError, match="save_memory"):
        SyncBatchNormAct(3, act=torch.nn.Tanh(), save_memory=True)


def test_sync_batchnorm_act_applies_activation():
    from batchnorm.nn import BatchNormAct2d
    from batchnorm.nn import sync as sync_module
    from batchnorm.nn.sync_act import SyncBatchNormAct

    sync_module._warned_no_group = True  # the no-group warning is tested above
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for act in ("relu", "leaky_relu", "silu", "identity"):
        fused = BatchNormAct2d(3, act=act).double()
        converted = SyncBatchNormAct(3, act=act).double()
        torch.testing.assert_close(converted(x), fused(x), rtol=1e-10, atol=1e-10)
    module_act = SyncBatchNormAct(3, act=torch.nn.Tanh()).double()
    assert float(module_act(x).detach().abs().max()) < 1.0


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
    offset=st.sampled_from([0.0, 1e4, -1e8]),
    seed=st.integers(0, 2**16),
)
def test_combine_stats_equals_statistics_of_the_concatenation(sizes, offset, seed):
    """Chan's combine of per-rank (n, mean, M2), against the reference on the whole batch,
    including empty ranks and offsets where sum(x^2) - sum(x)^2 would lose every digit."""
    from batchnorm.nn.sync import combine_stats

    rng = np.random.default_rng(seed)
    parts = [rng.normal(offset, 1.0, (n, 3, 2)) for n in sizes]
    _, cache = reference.forward(np.concatenate(parts), None, None)
    counts = torch.tensor([2.0 * n for n in sizes], dtype=torch.float64)
    means = torch.tensor(np.stack([p.mean((0, 2)) if len(p) else np.zeros(3) for p in parts]))
    m2s = torch.tensor(np.stack([p.var((0, 2)) * 2 * len(p) if len(p) else np.zeros(3) for p in parts]))
    n, mean, var = combine_stats(counts, means, m2s)
    assert int(n) == 2 * sum(sizes)
    np.testing.assert_allclose(mean.numpy(), cache.mean, rtol=1e-12, atol=1e-12 * (1 + abs(offset)))
    # the data themselves are only known to ulp(offset) ~ 2e-16 |offset|; E[x^2] - E[x]^2 would
    # be off by ~2e-16 offset^2 (= 100% at 1e8)
    np.testing.assert_allclose(var.numpy(), cache.var, rtol=1e-9, atol=1e-9 + 4e-16 * abs(offset))


def test_functional_and_empty_global_batch():
    from batchnorm.nn import SyncBatchNorm
    from batchnorm.nn import sync as sync_module
    from batchnorm.nn.sync import sync_batch_norm

    sync_module._warned_no_group = True
    x = torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 3
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y = sync_batch_norm(x, rm, rv, training=True)
    torch.testing.assert_close(y, torch.nn.functional.batch_norm(x, None, None, training=True))
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.var((0, 2)))
    y_eval = sync_batch_norm(x, rm, rv, training=False)
    torch.testing.assert_close(y_eval, torch.nn.functional.batch_norm(x, rm, rv, training=False))
    # a global batch of 0 samples: empty output, statistics and counter untouched, grads flow
    m = SyncBatchNorm(3).double()
    empty = torch.randn(0, 3, 4, dtype=torch.float64, requires_grad=True)
    out = m(empty)
    out.sum().backward()
    assert out.shape == (0, 3, 4) and int(m.num_batches_tracked) == 0
    assert torch.equal(m.running_var, torch.ones(3, dtype=torch.float64))
    assert torch.equal(m.weight.grad, torch.zeros(3, dtype=torch.float64))
