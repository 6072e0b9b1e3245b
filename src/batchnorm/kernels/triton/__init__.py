"""GPU kernels in Triton, with the contract of ``batchnorm.kernels`` on torch tensors.

CUDA tensors run natively; CPU tensors run in Triton's interpreter when ``TRITON_INTERPRET=1``
was set before triton was imported (how the tests check these kernels without a GPU).
``import batchnorm`` never imports this package: ``batchnorm._torch_ops`` does, when the first
CUDA tensor arrives.
"""

from batchnorm.kernels.triton._act_dispatch import backward as backward_act
from batchnorm.kernels.triton._act_dispatch import backward_dx_act, backward_reduce_act, normalize_act
from batchnorm.kernels.triton._act_dispatch import forward_inference as forward_inference_act
from batchnorm.kernels.triton._act_dispatch import forward_train as forward_train_act
from batchnorm.kernels.triton._dispatch import (
    INTERPRETED,
    LaunchConfig,
    act_code,
    backward,
    backward_dx,
    backward_reduce,
    channel_stats,
    forward_train,
    normalize,
    plan,
)

__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "act_code",
    "backward",
    "backward_act",
    "backward_dx_act",
    "backward_reduce_act",
    "backward_dx",
    "backward_reduce",
    "channel_stats",
    "forward_inference_act",
    "forward_train",
    "forward_train_act",
    "normalize",
    "normalize_act",
    "plan",
]
