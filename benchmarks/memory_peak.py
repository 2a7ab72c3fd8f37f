"""Peak host-memory read rate, as torch reaches it: the bandwidth side of the CPU roofline.

A decode step must read every weight it multiplies and every cached K/V column
it attends over; at the batch sizes that fill a CPU that traffic, not the
arithmetic, can bound the step. The rate is the best of a few read-only
reductions over a buffer far larger than any cache, so it is what this machine
has shown torch can stream, not a datasheet figure.
"""
from __future__ import annotations

import time
from typing import Callable

import torch


def best_of(f: Callable[[], object], repeats: int) -> float:
    """The least wall time of ``repeats`` calls of f, after one warm-up call."""
    f()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def read_rate(nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """GB/s of each read-only kernel over ``nbytes`` and the peak (their maximum)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    kernels = {"sum_f32": lambda: x.sum(), "dot_f32": lambda: torch.dot(x, x),
               "amax_i32": lambda: x.view(torch.int32).amax()}
    rates = {}
    for name, f in kernels.items():
        rates[name] = round(nbytes / best_of(f, repeats) / 1e9, 2)
    return {"peak_gb_s": max(rates.values()), "kernels": rates, "buffer_bytes": nbytes}
