"""Kernel launches with less host time: the compiled kernel is reused without Triton's binder.

``kernel[grid](*args, **constexprs)`` runs Triton's ``JITFunction.run`` on every call: it binds
the arguments, specializes each one (dtype, 16-byte alignment, integer range and divisibility),
hashes that into a cache key and only then calls the compiled kernel's launcher. Measured on an
H100 host (Triton 3.6, the normalize kernel's 25 arguments): 26.5 us per launch through
``run``, 7.8 us calling the compiled kernel's launcher directly. A training step of one BN
layer launches 4 kernels, and torch's whole forward costs ~25 us of host time there.

``launch`` keeps, per kernel, the compiled kernel that ``run`` returned, under a key at least as
fine as Triton's specialization (per argument: tensor dtype and 16-byte alignment; integer
== 1, divisibility by 16 and 32-bit range; constexpr values; warps; device), and calls its
launcher for later calls with the same key. The first call of every key goes through ``run``
(which compiles), so a new specialization is never missed. Launch hooks (profilers such as
proton) and the interpreter take the plain path; ``BATCHNORM_TRITON_DIRECT_LAUNCH=0`` turns the
direct path off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton

# Kernels are decorated when their modules are imported: this is the mode they run in.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The launcher's calling convention used below is the one of Triton 3.4+ (``triton.knobs``),
# checked on 3.6 (H100) and 3.9; older Tritons take ``run`` only.
_ENABLED = (
    not INTERPRETED
    and hasattr(triton, "knobs")
    and os.environ.get("BATCHNORM_TRITON_DIRECT_LAUNCH", "1") not in ("", "0")
)
_COMPILED: dict[tuple, Any] = {}
_INT32 = range(-(2**31), 2**31)


def _spec(arg: Any) -> Any:
    """What Triton specializes a kernel argument on (or finer)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return arg == 1, arg % 16 == 0, arg in _INT32
    return type(arg)


def _hooks_idle() -> bool:
    runtime = triton.knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        # A HookChain with no hooks in it is idle; any other hook means "use Triton's run".
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def launch(
    kernel: Any, grid: tuple[int, ...], args: tuple, num_warps: int | None = None, **constexprs: Any
) -> None:
    """``kernel[grid](*args, num_warps=num_warps, **constexprs)``, reusing the compiled kernel."""
    options = {} if num_warps is None else {"num_warps": num_warps}
    if not _ENABLED or not _hooks_idle():
        kernel[grid](*args, **options, **constexprs)
        return
    device = torch.cuda.current_device()
    key = (kernel, device, num_warps, *constexprs.items(), *map(_spec, args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = kernel[grid](*args, **options, **constexprs)
        if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            _COMPILED[key] = compiled
        return
    stream = triton.runtime.driver.active.get_current_stream(device)
    grid_y = grid[1] if len(grid) > 1 else 1
    # The launcher takes every parameter in signature order, constexprs included.
    tail = [constexprs[name] for name in kernel.arg_names[len(args) :]]
    compiled.run(grid[0], grid_y, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *tail)  # fmt: skip
