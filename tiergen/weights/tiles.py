"""Resident CPU layer weights in AMX's tile layout, for the product kernels.

On a CPU with AVX-512 BF16, a bfloat16 layer matrix the CPU computes with in place is
kept as AMX right-operand tiles (tiergen/kernels/tile_pack.h), which is also the operand
layout of AVX-512's bf16 dot products. Its products run on a kernel at every row count:
linear.cpp on AMX, linear_avx512.cpp without it. The epilogue adds the bias and the
residual or takes a gated MLP's silu(g) * u before the one rounding, and long prompts go
through panel by panel. SmolLM2's layer products on AMX: 1.3-1.6x oneDNN's rate from 1 to
1,024 rows in cache; a 256 x 64-token prompt's products 1.27x in the engine, counting the
SiLU pass oneDNN needs. On a 2-core Zen 4: 1.06-1.08x at 256 rows, 1.8-2.3x at 1-4 rows
(BENCHMARKS.md §6).

Matrices wider than the kernel's ``MAX_DIMS`` input dims stay with oneDNN: their
blocks then no longer fit the caches the kernel counts on.

A plain weight (a streamed layer's) goes through the same kernel, tiled per call:
every placement computes the same bits.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import kernels

# Input dims up to which a matrix is tiled, per kernel. AMX: past 4,096 a column pair's tiles
# (256 KiB at 4,096) spill from L2 (at 8,192 dims in: 0.65-0.70x oneDNN's rate; a 2,048-wide
# layer's products: 0.95-1.07x). AVX-512 BF16 (2-core Zen 4, 2,048 columns): 1.02-1.05x oneDNN
# up to 2,048 dims in at 256 rows, 0.94-0.97x at 3,072-4,096 (BENCHMARKS.md §6).
MAX_DIMS = {"linear": 4096, "linear_avx512": 2048}


def max_dims() -> int:
    """Input dims up to which the product kernel serving here takes a matrix (0: none serves)."""
    name = kernels.first_of(kernels.LINEAR_KERNELS)
    return 0 if name is None else MAX_DIMS[name]


def serves(dtype: torch.dtype) -> bool:
    """Whether layer matrices at ``dtype`` are kept as tiles here (bfloat16 where a product kernel serves)."""
    return dtype == torch.bfloat16 and kernels.linear_kernel() is not None


class TilePacked:
    """A bfloat16 [N, K] matrix as the kernel's tiles ([2 ceil(N/32), ceil(K/32), 16, 32],
    zero-padded), with the shape of the matrix it holds."""

    is_mkldnn = False

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.n = t.shape[0]
        self.blocks = kernels.linear_kernel().pack(t)
        self.nbytes = self.blocks.nbytes

    def dense(self) -> torch.Tensor:
        """The plain matrix, exactly."""
        return kernels.linear_kernel().unpack(self.blocks, *self.shape)


def holds(t: torch.Tensor) -> bool:
    """Whether the 2-D matrix ``t`` is kept as tiles here."""
    return serves(t.dtype) and t.shape[1] <= max_dims()


def plain(w: Any) -> Any:
    """A weight as other products take it: a tiled one as its plain matrix (for inputs the
    kernel does not take, which the engine does not make), else as it is."""
    return w.dense() if isinstance(w, TilePacked) else w


def kernel_for(x: torch.Tensor, w: Any) -> Any:
    """The product kernel where it computes x @ w.T: bfloat16 rows on a CPU of at most ``max_dims()``
    dims, against tiles or a plain bfloat16 CPU matrix; else None. (Called for every product:
    ~1 us, the cheapest tests first.)"""
    if not (x.is_cpu and x.dtype == torch.bfloat16 and x.dim() >= 2 and x.stride(-1) == 1):
        return None
    if type(w) is not TilePacked and not (isinstance(w, torch.Tensor) and w.is_cpu and w.dtype == torch.bfloat16
                                          and w.dim() == 2 and w.stride(-1) == 1 and not w.is_mkldnn):
        return None
    if x.shape[-1] > max_dims():
        return None
    return kernels.linear_kernel()


def product(kernel: Any, x: torch.Tensor, w: Any, b: torch.Tensor | None = None, other: torch.Tensor | None = None,
            gated: bool = False, out_float: bool = False) -> torch.Tensor:
    """x @ w.T + b (+ other), or silu(g) * u of the gated halves, through ``kernel_for``'s kernel."""
    mat, n = (w.blocks, w.n) if type(w) is TilePacked else (w, w.shape[0])
    if other is not None and not other.is_contiguous():
        other = other.contiguous()
    if x.dim() == 2:
        return kernel.linear(x, mat, n, b, other, gated, out_float)
    rows = x.reshape(-1, x.shape[-1])
    y = kernel.linear(rows, mat, n, b, None if other is None else other.reshape(rows.shape[0], -1), gated, out_float)
    return y.view(*x.shape[:-1], y.shape[-1])


def gated_fits(w: Any) -> bool:
    """Whether a gated pair's halves (g | u) line up with the kernel's 16-column blocks."""
    return w.shape[0] % 32 == 0
