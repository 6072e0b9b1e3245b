"""The running-average update of the running estimates, torch's convention::

    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)

``var`` is the batch's biased variance over ``m`` values per channel; Bessel's correction makes
the running estimate unbiased, as torch.nn does (Keras and Flax weight the old value by
``momentum`` instead).
"""

from __future__ import annotations

import numba


@numba.njit(cache=True, error_model="numpy", nogil=True)
def running_step(rm, rv, mean, var, momentum, count):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """rm <- (1 - momentum) rm + momentum mean; rv <- (1 - momentum) rv + momentum m/(m-1) var.

    No fastmath: without FMA contraction each step rounds as the NumPy expressions
    ``rm *= keep; rm += w_mean * mean`` do, the three weights rounded to the arrays' dtype
    first (as NumPy scalars of that dtype would be). ``mean`` and ``var`` may come in float64
    for float32 buffers: they are rounded to float32 here, as ``astype`` would have (one NumPy
    call less per training step for each; such calls cost 10-20 us each when a layer's work has
    just gone through the caches).
    """
    dt = rm.dtype.type
    keep = dt(1.0 - momentum)
    w_mean = dt(momentum)
    w_var = dt(momentum * count / (count - 1))
    for i in range(rm.shape[0]):
        rm[i] = rm[i] * keep + w_mean * dt(mean[i])
        rv[i] = rv[i] * keep + w_var * dt(var[i])


@numba.njit(cache=True, error_model="numpy", nogil=True)
def running_step_counted(rm, rv, tracked, mean, var, momentum, count):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """``running_step`` and ``tracked += 1`` (a 0-d integer array: a module's batch counter)."""
    running_step(rm, rv, mean, var, momentum, count)
    tracked[()] += 1


def numpy_running_step(running_mean, running_var, mean, var, count: int, momentum: float) -> None:  # type: ignore[no-untyped-def]
    """``running_step`` with NumPy's ufuncs, for float16 buffers (numba has no float16 arithmetic)."""
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += (momentum * count / (count - 1)) * var
