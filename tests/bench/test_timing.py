"""bench.timing: what the interleaving calls, how many calls a sample holds, the allocator state."""

from __future__ import annotations

import platform
import resource

import numpy as np
import pytest

from batchnorm.bench import timing


def test_interleaved_times_number_consecutive_calls_per_sample():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    samples = timing.interleaved(calls, repeats=4, warmup=1, number=3)
    assert {n: len(s) for n, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for s in samples.values() for t in s)
    timed = order[3:]  # after one warm-up call each
    assert len(timed) == 4 * 3 * 3
    # runs of three calls of one implementation; each repeat starts one implementation later
    runs = [timed[i] for i in range(0, len(timed), 3)]
    assert all(timed[i : i + 3] == [runs[i // 3]] * 3 for i in range(0, len(timed), 3))
    assert runs == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_interleaved_rejects_a_sample_of_no_calls():
    with pytest.raises(ValueError, match="number: expected calls per sample >= 1, got 0"):
        timing.interleaved({"a": lambda: None}, repeats=1, number=0)


def test_calls_per_sample_follows_the_fastest_and_is_bounded():
    spin = lambda: sum(range(20000))  # noqa: E731
    slow = timing.calls_per_sample({"spin": spin}, target_s=1e-9)
    assert slow == 1  # a call already longer than the target: one per sample
    assert timing.calls_per_sample({"spin": spin, "noop": lambda: None}, target_s=1.0, limit=50) == 50


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_steady_allocator_reuses_freed_memory_below_32_mib():
    state = timing.steady_allocator()
    if not state.startswith("glibc"):
        pytest.skip(f"not glibc: {state}")
    # 2 MiB: above glibc's initial 128 KiB mmap threshold, below NumPy's 4 MiB huge-page advice.
    # Once freed, the same size comes back from the heap: no fresh zero-filled pages (512 faults).
    np.ones(1 << 18).sum()
    faults = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        np.ones(1 << 18).sum()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert min(faults) < 64, faults
