"""BatchNormAct1d/2d against torch.nn.BatchNorm*d followed by the torch activation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchnorm.nn import BatchNormAct1d, BatchNormAct2d
from batchnorm.nn.act import batch_norm_act

ACTS = ["identity", "relu", "leaky_relu", "silu"]
SLOPE = 0.2


def torch_act(z: torch.Tensor, act: str) -> torch.Tensor:
    return {
        "identity": lambda v: v,
        "relu": F.relu,
        "silu": F.silu,
        "leaky_relu": lambda v: F.leaky_relu(v, SLOPE),
    }[act](z)


# (module class, torch class, input shape, memory format)
LAYOUTS = {
    "2d": (BatchNormAct2d, torch.nn.BatchNorm2d, (6, 5, 7, 4), torch.contiguous_format),
    "2d-channels-last": (BatchNormAct2d, torch.nn.BatchNorm2d, (6, 5, 7, 4), torch.channels_last),
    "1d-NC": (BatchNormAct1d, torch.nn.BatchNorm1d, (33, 7), torch.contiguous_format),
    "1d-NCL": (BatchNormAct1d, torch.nn.BatchNorm1d, (6, 5, 9), torch.contiguous_format),
}


def pair(layout: str, act: str, dtype: torch.dtype, save_memory: bool = False, **kwargs):
    ours_cls, torch_cls, shape, fmt = LAYOUTS[layout]
    torch.manual_seed(0)
    ours = ours_cls(shape[1], act=act, negative_slope=SLOPE, save_memory=save_memory, dtype=dtype, **kwargs)
    theirs = torch_cls(shape[1], dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())  # the same state_dict as torch's BatchNorm
    x = (torch.randn(shape, dtype=dtype) * 2 + 3).to(memory_format=fmt)
    return ours, theirs, x


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 2e-5}


def run(module, x, dy, act=None):
    x = x.detach().clone().requires_grad_(True)
    y = module(x) if act is None else torch_act(module(x), act)
    y.backward(dy)
    return y, x.grad


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_training_matches_torch(layout, act, dtype, momentum):
    save_options = [False, True] if act in ("identity", "leaky_relu") else [False]
    for save_memory in save_options:
        ours, theirs, x = pair(layout, act, dtype, save_memory, momentum=momentum)
        for step in range(2):  # two steps: the running stats and momentum=None's 1/k weights
            dy = torch.randn(x.shape, dtype=dtype)
            y, dx = run(ours, x + step, dy)
            y_t, dx_t = run(theirs, x + step, dy, act)
            t = tol(dtype)
            if save_memory and dtype == torch.float32:
                t = {"rtol": 1e-4, "atol": 1e-4}  # x_hat recovered from the float32 output
            torch.testing.assert_close(y, y_t, **tol(dtype))
            torch.testing.assert_close(dx, dx_t, **t)
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **t)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, **t)
            torch.testing.assert_close(ours.running_mean, theirs.running_mean, **tol(dtype))
            torch.testing.assert_close(ours.running_var, theirs.running_var, **tol(dtype))
            assert ours.num_batches_tracked == theirs.num_batches_tracked
            assert y.stride() == y_t.stride()  # channels-last stays channels-last


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eval_matches_torch_with_and_without_grad(layout, act):
    ours, theirs, x = pair(layout, act, torch.float64)
    for module in (ours, theirs):
        module(x * 0.5 - 1)  # some non-trivial running stats
        module.eval()
    with torch.no_grad():  # the fused kernel
        torch.testing.assert_close(ours(x), torch_act(theirs(x), act), **tol(torch.float64))
    dy = torch.randn(x.shape, dtype=torch.float64)
    y, dx = run(ours, x, dy)  # autograd through the running statistics
    y_t, dx_t = run(theirs, x, dy, act)
    torch.testing.assert_close(y, y_t, **tol(torch.float64))
    torch.testing.assert_close(dx, dx_t, **tol(torch.float64))


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_affine_and_track_running_stats_variants(affine, track):
    ours, theirs, x = pair("2d", "relu", torch.float64, affine=affine, track_running_stats=track)
    dy = torch.randn(x.shape, dtype=torch.float64)
    for module in (ours, theirs):
        module.eval()  # without running stats, eval uses batch statistics too
    y, dx = run(ours, x, dy)
    y_t, dx_t = run(theirs, x, dy, "relu")
    torch.testing.assert_close(y, y_t, **tol(torch.float64))
    torch.testing.assert_close(dx, dx_t, **tol(torch.float64))


@pytest.mark.parametrize(
    "save_memory,act", [(False, "relu"), (False, "silu"), (True, "leaky_relu"), (True, "identity")]
)
@pytest.mark.parametrize("layout", ["2d", "2d-channels-last", "1d-NC"])
def test_gradcheck_float64(layout, act, save_memory):
    _, _, _, fmt = LAYOUTS[layout]
    shape = (5, 3) if layout == "1d-NC" else (3, 3, 2, 2)  # every element is perturbed twice
    x = torch.randn(shape, dtype=torch.float64).to(memory_format=fmt).requires_grad_(True)
    weight = torch.rand(x.shape[1], dtype=torch.float64, requires_grad=True) + 0.5
    bias = torch.randn(x.shape[1], dtype=torch.float64, requires_grad=True)

    def fn(v, w, b):
        # + 0.3 moves z off relu's kink at 0, where finite differences mean nothing
        return batch_norm_act(v + 0.3, None, None, w, b, True, 0.1, 1e-5, act, SLOPE, save_memory)

    assert torch.autograd.gradcheck(fn, (x, weight, bias), eps=1e-6, atol=1e-6)


def test_save_memory_keeps_only_the_output():
    """With save_memory the autograd graph holds y (shared with the next layer), not x."""
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    saved: dict[bool, set] = {}
    for save_memory in (False, True):
        module = BatchNormAct2d(4, act="leaky_relu", save_memory=save_memory)
        ptrs: set = set()

        def pack(t, ptrs=ptrs):
            ptrs.add(t.untyped_storage().data_ptr())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x * 1.0)
        saved[save_memory] = ptrs
        assert y.untyped_storage().data_ptr() in ptrs if save_memory else True
    assert len(saved[True]) <= len(saved[False])


def test_errors_are_clear():
    with pytest.raises(ValueError, match="save_memory=True.*invertible"):
        BatchNormAct2d(4, act="relu", save_memory=True)
    with pytest.raises(ValueError, match="act: expected one of"):
        BatchNormAct2d(4, act="gelu")
    module = BatchNormAct2d(4)
    with pytest.raises(ValueError, match="BatchNormAct2d: input must be 4-D"):
        module(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="input has 3 channels"):
        module(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormAct1d(4)(torch.randn(1, 4))
    empty = BatchNormAct2d(4)(torch.randn(0, 4, 3, 3))
    assert empty.shape == (0, 4, 3, 3)
    assert module.num_batches_tracked == 0  # errors leave the state untouched
    module = BatchNormAct2d(4, act="identity", save_memory=True)
    with torch.no_grad():
        module.weight[1] = 0
    with pytest.raises(ValueError, match="weight \\(gamma\\), which is 0 at channels \\[1\\]"):
        module(torch.randn(2, 4, 3, 3))
    assert module.num_batches_tracked == 0


def test_repr_and_state_dict_load_from_torch():
    module = BatchNormAct2d(8, act="leaky_relu", negative_slope=0.1, save_memory=True)
    assert "act='leaky_relu', negative_slope=0.1, save_memory=True" in repr(module)
    torch_bn = torch.nn.BatchNorm2d(8)
    torch_bn(torch.randn(4, 8, 3, 3))
    module.load_state_dict(torch_bn.state_dict())
    torch.testing.assert_close(module.running_var, torch_bn.running_var)


@pytest.mark.parametrize("layout", ["2d", "1d-NC"])
def test_bias_false_matches_torch(layout):
    """torch 2.13's keyword-only bias=: every torch keyword constructs it; bias=False matches
    torch's BatchNorm(bias=False) + activation, state_dict keys included."""
    import inspect

    ours_cls, torch_cls, shape, _ = LAYOUTS[layout]
    defaults = {
        k: p.default for k, p in inspect.signature(torch_cls).parameters.items() if k != "num_features"
    }
    ours_cls(shape[1], **defaults)
    ours = ours_cls(shape[1], act="leaky_relu", negative_slope=SLOPE, save_memory=True, bias=False).double()
    theirs = torch_cls(shape[1], bias=False).double()
    assert ours.bias is None and set(ours.state_dict()) == set(theirs.state_dict())
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    dy = torch.randn(shape, dtype=torch.float64)
    y, dx = run(ours, x, dy)
    y_ref, dx_ref = run(theirs, x, dy, act="leaky_relu")
    torch.testing.assert_close(y, y_ref, **tol(torch.float64))
    torch.testing.assert_close(dx, dx_ref, **tol(torch.float64))
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol(torch.float64))
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol(torch.float64))


@pytest.mark.parametrize("save_memory", [False, True])
def test_modifying_what_backward_reads_in_place_raises(save_memory):
    # The numba backward reads NumPy views made in the forward; the saved tensors' version
    # counters still guard them (torch.nn raises the same way).
    module = BatchNormAct2d(4, act="leaky_relu", save_memory=save_memory)
    x = torch.randn(8, 4, 5, 5, requires_grad=True)
    source = x * 1.0
    y = module(source)
    with torch.no_grad():
        (y if save_memory else source).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward(torch.ones_like(y))


@pytest.mark.parametrize("save_memory", [False, True])
def test_float16_input_matches_float32_computation(save_memory):
    # float16 x (float32 parameters) takes the general path: the kernels compute in float32.
    torch.manual_seed(1)
    ours = BatchNormAct2d(5, act="leaky_relu", negative_slope=SLOPE, save_memory=save_memory)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    x16 = (torch.randn(6, 5, 7, 4) * 2 + 3).half().requires_grad_(True)
    dy16 = torch.randn(6, 5, 7, 4).half()
    y16 = ours(x16)
    y16.backward(dy16)
    x32 = x16.detach().float().requires_grad_(True)
    w = ours.weight.detach().clone().requires_grad_(True)
    b = ours.bias.detach().clone().requires_grad_(True)
    y32 = F.leaky_relu(F.batch_norm(x32, None, None, w, b, training=True), SLOPE)
    y32.backward(dy16.float())
    assert y16.dtype == x16.grad.dtype == torch.float16
    torch.testing.assert_close(y16.float(), y32, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(x16.grad.float(), x32.grad, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(ours.weight.grad, w.grad, rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(ours.bias.grad, b.grad, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize("save_memory", [False, True])
@pytest.mark.parametrize("act", ["identity", "leaky_relu"])
@pytest.mark.parametrize(
    "cls, torch_cls, shape, fmt",
    [
        (BatchNormAct1d, torch.nn.BatchNorm1d, (256, 32), torch.contiguous_format),
        (BatchNormAct2d, torch.nn.BatchNorm2d, (16, 64, 7, 7), torch.contiguous_format),
        (BatchNormAct2d, torch.nn.BatchNorm2d, (64, 3, 2, 3), torch.contiguous_format),
        (BatchNormAct2d, torch.nn.BatchNorm2d, (16, 64, 7, 7), torch.channels_last),
    ],
)
def test_training_gradients_keep_float32_accuracy_at_a_large_offset(
    cls, torch_cls, shape, fmt, act, save_memory, float64_gaps
):
    """mean 1e4, std 1e-2, as BatchNorm's test: the backward forms x_hat from the float64 mean
    (a float32-rounded one would put dweight off by ~5e-2 of its largest value), and
    save_memory recovers it from y; both stay within a few float32 ulps of float64."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(*shape, generator=gen)).to(memory_format=fmt)
    dy = torch.randn(*shape, generator=gen).to(memory_format=fmt)
    ours = cls(shape[1], act=act, negative_slope=SLOPE, save_memory=save_memory)
    exact = torch_cls(shape[1]).double()
    gaps = float64_gaps(ours, exact, x, dy, post=lambda z: torch_act(z, act))
    assert max(gaps.values()) < 1e-6, gaps
    torch.testing.assert_close(ours.running_mean, exact.running_mean.float(), rtol=3e-7, atol=0)
