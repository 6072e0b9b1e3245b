"""batchnorm.nn.BatchNorm1d/2d/3d against torch.nn over training runs, checkpoints and bad input."""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch

import batchnorm.nn as bnn
from batchnorm import _torch_ops
from batchnorm.nn.batchnorm import BatchNormBase

PAIRS = {
    (8, 5): (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
    (4, 5, 7): (bnn.BatchNorm1d, torch.nn.BatchNorm1d),
    (2, 5, 4, 3): (bnn.BatchNorm2d, torch.nn.BatchNorm2d),
    (2, 5, 3, 2, 2): (bnn.BatchNorm3d, torch.nn.BatchNorm3d),
}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
# mode of each step: the switches between train and eval are what the test is about
SCHEDULE = ["train", "train", "eval", "train", "eval", "train"]


def _pair(shape, dtype=torch.float32, **kwargs):
    ours_cls, torch_cls = PAIRS[shape]
    ours = ours_cls(shape[1], dtype=dtype, **kwargs)
    theirs = torch_cls(shape[1], dtype=dtype, **kwargs)
    if ours.affine:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            ours.weight.copy_(torch.randn(shape[1], generator=gen))
            ours.bias.copy_(torch.randn(shape[1], generator=gen))
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.ndim == 4 else torch.channels_last_3d)
    if layout == "non_contiguous":
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


def _run_schedule(ours, theirs, shape, dtype, layout="contiguous"):
    gen = torch.Generator().manual_seed(0)
    for step, mode in enumerate(SCHEDULE):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        x = torch.randn(shape, generator=gen, dtype=dtype) * (step + 1) + step
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        outs = []
        for m in (ours, theirs):
            m.zero_grad()
            xi = _layout(x.clone(), layout).requires_grad_()
            y = m(xi)
            y.backward(dy)
            grads = [xi.grad] + ([m.weight.grad, m.bias.grad] if m.affine else [])
            outs.append([y, *grads, *m.buffers()])
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda s, step=step: f"step {step}: {s}")
        assert outs[0][0].stride() == outs[1][0].stride()


@pytest.mark.parametrize("shape", list(PAIRS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_matches_torch_over_train_eval_switches(shape, dtype, momentum, affine, track_running_stats):
    ours, theirs = _pair(
        shape, dtype, momentum=momentum, affine=affine, track_running_stats=track_running_stats
    )
    _run_schedule(ours, theirs, shape, dtype)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((4, 5, 7), "non_contiguous"),
        ((2, 5, 4, 3), "non_contiguous"),
        ((2, 5, 4, 3), "channels_last"),
        ((2, 5, 3, 2, 2), "channels_last"),
    ],
)
def test_layouts_match_torch_and_are_kept(shape, layout):
    ours, theirs = _pair(shape)
    _run_schedule(ours, theirs, shape, torch.float32, layout)


def test_buffers_not_tracked_after_construction_like_torch():
    """track_running_stats switched off later: torch keeps using the buffers in eval."""
    ours, theirs = _pair((2, 5, 4, 3), momentum=None)
    ours.track_running_stats = theirs.track_running_stats = False
    _run_schedule(ours, theirs, (2, 5, 4, 3), torch.float32)


@pytest.mark.parametrize("shape", list(PAIRS))
def test_is_a_drop_in(shape):
    ours, theirs = _pair(shape, momentum=None, affine=False)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert isinstance(copy.deepcopy(ours), type(ours))


def test_constructor_device_and_dtype():
    bn = bnn.BatchNorm2d(4, device="cpu", dtype=torch.float64)
    assert {t.dtype for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)} == {torch.float64}
    assert bn(torch.randn(2, 4, 3, 3, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(direction):
    src, dst = _pair((2, 5, 4, 3))
    if direction == "torch_to_ours":
        src, dst = dst, src
    src.train()
    src(torch.randn(2, 5, 4, 3) * 3 + 1)
    dst.load_state_dict(src.state_dict())
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    src.eval()
    dst.eval()
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batches_seen", [0, 7])
def test_old_checkpoint_without_num_batches_tracked(batches_seen):
    """A version-1 checkpoint loads strictly; torch keeps the module's own count, and so do we."""
    ours, theirs = _pair((8, 5))
    old = OrderedDict((k, v * 2) for k, v in theirs.state_dict().items() if k != "num_batches_tracked")
    old._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    for m in (ours, theirs):
        m.num_batches_tracked.fill_(batches_seen)
        m.load_state_dict(copy.deepcopy(old))
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert ours.num_batches_tracked.item() == batches_seen
    assert torch.equal(ours.running_var, old["running_var"])


@pytest.mark.parametrize(
    ("key", "value"), [("running_mean", float("nan")), ("running_var", float("inf")), ("running_var", -1.0)]
)
def test_non_finite_checkpoint_rejected_at_load(key, value):
    ours, theirs = _pair((2, 5, 4, 3))
    state = theirs.state_dict()
    state[key][2] = value
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=rf"state_dict\['{key}'\] has 1 of 5 entries"):
        ours.load_state_dict(state)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k])


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


# name -> (module, input, exception, message fragment)
BAD_INPUTS = {
    "2d gets 3-D": (
        lambda: bnn.BatchNorm2d(16),
        lambda: torch.randn(8, 16, 32),
        ValueError,
        "BatchNorm2d: input must be 4-D (N, C, H, W), got 3-D with shape (8, 16, 32); "
        "for (N, C, L) use BatchNorm1d",
    ),
    "1d gets 4-D": (
        lambda: bnn.BatchNorm1d(16),
        lambda: torch.randn(2, 16, 4, 4),
        ValueError,
        "BatchNorm1d: input must be 2-D (N, C) or 3-D (N, C, L), got 4-D with shape (2, 16, 4, 4); "
        "for (N, C, H, W) use BatchNorm2d",
    ),
    "3d gets 4-D": (
        lambda: bnn.BatchNorm3d(16),
        lambda: torch.randn(2, 16, 4, 4),
        ValueError,
        "use BatchNorm2d; for a single unbatched sample add the batch axis with x.unsqueeze(0)",
    ),
    "wrong channels": (
        lambda: bnn.BatchNorm2d(16),
        lambda: torch.randn(2, 8, 4, 4),
        ValueError,
        "BatchNorm2d: input has 8 channels (axis 1 of shape (2, 8, 4, 4)) but the layer was built with "
        "num_features=16",
    ),
    "wrong channels without parameters or buffers": (
        lambda: bnn.BatchNorm2d(16, affine=False, track_running_stats=False),
        lambda: torch.randn(2, 8, 4, 4),
        ValueError,
        "num_features=16",
    ),
    "one value per channel": (
        lambda: bnn.BatchNorm1d(16),
        lambda: torch.randn(1, 16),
        ValueError,
        "drop_last=True in the DataLoader",
    ),
    "eps zero": (
        lambda: bnn.BatchNorm1d(4, eps=0.0),
        lambda: torch.randn(8, 4),
        ValueError,
        "eps must be > 0",
    ),
    "integer input": (
        lambda: bnn.BatchNorm1d(4),
        lambda: torch.ones(8, 4, dtype=torch.int64),
        TypeError,
        "input must be floating point (float16, bfloat16, float32 or float64), got int64",
    ),
    "float32 input, float64 module": (
        lambda: bnn.BatchNorm1d(4, dtype=torch.float64),
        lambda: torch.randn(8, 4),
        TypeError,
        "BatchNorm1d: weight has dtype float64 but input has float32",
    ),
    "half input, bfloat16 module": (
        lambda: bnn.BatchNorm1d(4, dtype=torch.bfloat16),
        lambda: torch.randn(8, 4, dtype=torch.float16),
        TypeError,
        "weight has dtype bfloat16 but input has float16",
    ),
    "device mismatch": (
        lambda: bnn.BatchNorm1d(4),
        lambda: torch.randn(8, 4, device="meta"),
        ValueError,
        "weight is on cpu but input is on meta",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_state_untouched(case):
    make_module, make_input, error, fragment = BAD_INPUTS[case]
    bn = make_module()
    bn.train()
    before = _snapshot(bn)
    with pytest.raises(error) as info:
        bn(make_input())
    assert fragment in str(info.value)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_one_value_per_channel_is_fine_in_eval():
    bn = bnn.BatchNorm1d(4).eval()
    x = torch.randn(1, 4)
    torch.testing.assert_close(bn(x), torch.nn.BatchNorm1d(4).eval()(x))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    bn = bnn.BatchNorm2d(3).train(training)
    before = _snapshot(bn)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.shape == (0, 3, 4, 4)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_with_float32_module(dtype):
    ours, theirs = _pair((2, 5, 4, 3))
    x = (torch.randn(2, 5, 4, 3) * 2 + 1).to(dtype)
    y = ours(x)
    # torch on the same rounded values in float32: identical statistics, one rounding apart
    y_ref = theirs(x.float()).detach()
    assert y.dtype == dtype
    resolution = torch.finfo(dtype).eps * float(y_ref.abs().max())
    torch.testing.assert_close(y.detach().float(), y_ref, rtol=0, atol=resolution)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


class _StatsByHand(BatchNormBase, torch.nn.BatchNorm2d):
    """A variant that computes its own statistics and uses the base's hooks, as ghost/sync BN do."""

    def forward(self, input):
        self._check_input(input)
        if not self._use_batch_stats():
            return torch.nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        mean, var = _torch_ops.channel_stats(input)
        self._update_running_stats(mean, var, input.numel() // input.shape[1])
        invstd = torch.rsqrt(var + self.eps)
        return _torch_ops.normalize(input, mean, invstd, self.weight, self.bias)


@pytest.mark.parametrize("momentum", [0.3, None])
def test_base_hooks_reproduce_torch(momentum):
    ours = _StatsByHand(5, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(5, momentum=momentum)
    for step in range(3):
        x = torch.randn(2, 5, 4, 3) + step
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3
    with pytest.raises(ValueError, match="_StatsByHand: input must be 4-D"):
        ours(torch.randn(2, 5, 4))


def _model(bn_cls):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3),
        bn_cls(6),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 6 * 6, 4),
        torch.nn.BatchNorm1d(4),
    )


@pytest.mark.slow
def test_torch_compile_matches_eager_torch():
    ours, theirs = _model(bnn.BatchNorm2d), _model(torch.nn.BatchNorm2d)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    x = torch.randn(5, 3, 8, 8)
    for train in (True, False):
        ours.train(train)
        theirs.train(train)
        y, y_ref = compiled(x), theirs(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if train:
            y.square().sum().backward()
            y_ref.square().sum().backward()
            torch.testing.assert_close(ours[0].weight.grad, theirs[0].weight.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours[1].running_var, theirs[1].running_var, rtol=1e-5, atol=1e-6)


def test_torch_export_eval_uses_the_standard_op_and_training_ours():
    model = _model(bnn.BatchNorm2d)
    x = torch.randn(5, 3, 8, 8)
    targets = {}
    for train in (False, True):
        model.train(train)
        program = torch.export.export(model, (x,))
        targets[train] = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "batchnorm.forward_inference.default" not in targets[False]
    assert (
        "aten.batch_norm.default" in targets[False]
        or "aten._native_batch_norm_legit_no_training.default" in targets[False]
    )
    assert "batchnorm.forward_train.default" in targets[True]
    model.eval()
    reference = _model(torch.nn.BatchNorm2d).eval()
    torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), reference(x))


class _GeneralPath(bnn.BatchNorm2d):
    """Overrides a hook (with the same behaviour), which must turn the eager fast path off."""

    def _count_batch(self):
        super()._count_batch()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fast_path_agrees_with_the_general_path(dtype, layout):
    fast, general = bnn.BatchNorm2d(5, dtype=dtype), _GeneralPath(5, dtype=dtype)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5)
        fast.bias.uniform_(-1, 1)
    general.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(3)
    for mode in SCHEDULE:
        x = _layout(torch.randn(4, 5, 3, 6, generator=gen, dtype=dtype) * 3 + 2, layout)
        dy = torch.randn(4, 5, 3, 6, generator=gen, dtype=dtype)
        outs = []
        for m in (fast, general):
            m.train(mode == "train")
            m.zero_grad()
            xi = x.clone().requires_grad_()
            y = m(xi)
            y.backward(dy)
            outs.append([y, xi.grad, m.weight.grad, m.bias.grad, *m.buffers()])
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, **TOL[dtype])
    assert fast.num_batches_tracked.item() == SCHEDULE.count("train")


def test_fast_path_declines_what_it_does_not_handle():
    bn = bnn.BatchNorm2d(3)
    assert bn._forward_fast(torch.randn(2, 3, 4, 4)) is not None
    assert bn._forward_fast(torch.randn(2, 3, 4, 4, dtype=torch.float16)) is None
    assert bn._forward_fast(torch.randn(2, 4, 4, 4)) is None  # wrong channels: general path raises
    assert bn._forward_fast(torch.randn(1, 3, 1, 1)) is None  # one value per channel in training
    assert bnn.BatchNorm2d(3, momentum=None)._forward_fast(torch.randn(2, 3, 4, 4)) is None
    before = bn.num_batches_tracked.item()
    with pytest.raises(ValueError, match="num_features=3"):
        bn(torch.randn(2, 4, 4, 4))
    assert bn.num_batches_tracked.item() == before
    with torch.no_grad():
        bn.eval()
        y = bn._forward_fast(torch.randn(2, 3, 4, 4))
    assert y is not None and y.grad_fn is None


def test_bias_argument_reaches_torch_only_when_false(monkeypatch):
    """torch before 2.13 has no ``bias=`` in its batch-norm constructor: the default layer must
    still build there, and ``bias=False`` must say which torch it needs."""
    from batchnorm.nn import batchnorm as bn_module

    assert bn_module.torch_bias_kwarg(True, "BatchNormAct2d") == {}
    assert bn_module.torch_bias_kwarg(False, "BatchNormAct2d") == {"bias": False}
    monkeypatch.setattr(bn_module, "_TORCH_TAKES_BIAS", False)
    assert bn_module.torch_bias_kwarg(True, "BatchNormAct2d") == {}
    with pytest.raises(TypeError, match=r"BatchNormAct2d: bias=False needs torch >= 2.13"):
        bn_module.torch_bias_kwarg(False, "BatchNormAct2d")


@pytest.mark.parametrize(
    "shape, layout",
    [
        ((256, 32), "contiguous"),  # rows, one thread
        ((1024, 256), "contiguous"),  # rows, parallel
        ((16, 64, 7, 7), "contiguous"),  # fused channel blocks
        ((4, 8, 40, 40), "contiguous"),  # unfused channels-first rows of S
        ((64, 3, 2, 3), "contiguous"),  # short maps read as rows of C * S
        ((16, 64, 7, 7), "channels_last"),
    ],
)
def test_training_gradients_keep_float32_accuracy_at_a_large_offset(shape, layout, float64_gaps):
    """mean 1e4, std 1e-2: a float32-rounded mean is off by up to ~5e-4, 5% of the std, and
    every x_hat the backward forms from it with it (torch.nn: dweight off by ~5e-2 of its
    largest value). The backward gets the float64 mean: dx, dweight, dbias stay within a few
    float32 ulps of a float64 computation on the same values."""
    gen = torch.Generator().manual_seed(3)
    x = _layout(1e4 + 1e-2 * torch.randn(*shape, generator=gen), layout)
    dy = _layout(torch.randn(*shape, generator=gen), layout)
    ours = (bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d)(shape[1])
    exact = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(shape[1]).double()
    gaps = float64_gaps(ours, exact, x, dy)
    assert max(gaps.values()) < 1e-6, gaps
    # the running buffers: the float64 update, rounded once more to float32
    torch.testing.assert_close(ours.running_mean, exact.running_mean.float(), rtol=3e-7, atol=0)
    torch.testing.assert_close(ours.running_var, exact.running_var.float(), rtol=1e-5, atol=0)


@pytest.mark.slow
def test_torch_compile_gradients_keep_float32_accuracy_at_a_large_offset(float64_gaps):
    """The traced graph runs the custom op, whose statistics on the CPU kernels are float64:
    the compiled backward forms x_hat from the same mean as the eager one."""
    gen = torch.Generator().manual_seed(4)
    x = 1e4 + 1e-2 * torch.randn(16, 8, 7, 7, generator=gen)
    dy = torch.randn(16, 8, 7, 7, generator=gen)
    ours = bnn.BatchNorm2d(8)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    gaps = float64_gaps(compiled, torch.nn.BatchNorm2d(8).double(), x, dy)
    assert max(gaps.values()) < 1e-6, gaps
