"""Peak matmul rate of this CPU per dtype, as torch reaches it (``F.linear``).

The roofline of a throughput run is ``2 * matmul params * tokens / peak``; the
peak is the best rate ``F.linear`` reaches over a large square product and the
model's own layer shapes, whichever is highest, so a run is measured against
the best this machine has shown, not against what its shapes happen to get.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def linear_rate(m: int, k: int, n: int, dtype: torch.dtype, min_s: float = 0.5) -> float:
    """Best-of-repeats GFLOP/s of F.linear([m,k] x [n,k]^T) in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    for _ in range(2):
        F.linear(x, w)
    best, spent = float("inf"), 0.0
    while spent < min_s:
        t = time.perf_counter()
        F.linear(x, w)
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * m * k * n / best / 1e9


def peak_rates(shapes: list[tuple[int, int, int]], dtypes: tuple[torch.dtype, ...]) -> dict[str, dict]:
    """Per dtype: every probed shape's rate and the peak (their maximum)."""
    out: dict[str, dict] = {}
    for dt in dtypes:
        rates = {f"{m}x{k}x{n}": round(linear_rate(m, k, n, dt), 1) for m, k, n in shapes}
        out[str(dt).replace("torch.", "")] = {"peak_gflops": max(rates.values()), "shapes": rates}
    return out


def model_shapes(hidden: int, ffn: int, q_dim: int, kv_dim: int, vocab: int, rows: tuple[int, ...]
                 ) -> list[tuple[int, int, int]]:
    """(m, k, n) of a Llama layer's projections and the LM head at each row count, plus 4096^3."""
    shapes = [(4096, 4096, 4096)]
    for m in rows:
        shapes += [(m, hidden, q_dim), (m, hidden, kv_dim), (m, q_dim, hidden),
                   (m, hidden, ffn), (m, ffn, hidden), (m, hidden, vocab)]
    return shapes
