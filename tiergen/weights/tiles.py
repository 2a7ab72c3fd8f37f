"""Resident CPU layer weights in AMX's tile layout, for the AMX product kernel.

On a CPU with AMX, a bfloat16 layer matrix the CPU computes with in place is kept
as tiles (tiergen/kernels/linear.cpp). Products of up to ``MAX_ROWS`` rows -- every
decode step, short prompts -- run on that kernel, whose epilogue adds the bias and
the residual or takes a gated MLP's silu(g) * u before the one rounding: a SmolLM2
layer's products at 256 rows take 0.80 ms against oneDNN's 1.11 (1.1-2x from 1 to
1,024 rows; BENCHMARKS.md §6). Above that oneDNN's own blocking wins, so a long
prompt's products get the matrix from the tiles in oneDNN's layout, made once per
layer and forward and reused by its row chunks (~1 ms a SmolLM2 layer).

A plain weight (a streamed layer's) goes through the same kernel, tiled per call,
and large products through the same oneDNN call: every placement computes the
same bits.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from .. import kernels
from . import prepack

# Rows up to which a product runs on the tile kernel: above, oneDNN's blocking of the rows
# wins (a SmolLM2 layer's products: 1.12x at 1,024 rows, 0.67x at 1,536).
MAX_ROWS = 1024


def serves(dtype: torch.dtype) -> bool:
    """Whether layer matrices at ``dtype`` are kept as tiles here (bfloat16 on a CPU with AMX)."""
    return dtype == torch.bfloat16 and kernels.load("linear") is not None


class TilePacked:
    """A bfloat16 [N, K] matrix as the kernel's tiles ([2 ceil(N/32), ceil(K/32), 16, 32],
    zero-padded), with the shape of the matrix it holds."""

    is_mkldnn = False

    def __init__(self, t: torch.Tensor):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.n = t.shape[0]
        self.blocks = kernels.load("linear").pack(t)
        self.nbytes = self.blocks.nbytes

    def dense(self) -> torch.Tensor:
        """The plain matrix, exactly."""
        return kernels.load("linear").unpack(self.blocks, *self.shape)


# Each thread's oneDNN copies of the tiled matrices its large products last used, one per
# shape: a prompt's row chunks reuse a layer's copies and the next layer replaces them, so
# at most one layer's matrices are held twice at a time.
_copies = threading.local()


def for_onednn(w: Any) -> Any:
    """A weight in a form oneDNN's products take: a tiled one as a oneDNN-packed copy (plain
    where oneDNN cannot pack), else as it is."""
    if not isinstance(w, TilePacked):
        return w
    held = getattr(_copies, "by_shape", None)
    if held is None:
        held = _copies.by_shape = {}
    owner, copy = held.get(tuple(w.shape), (None, None))
    if owner is None or owner() is not w:   # a weak reference: a held copy keeps no model alive
        plain = w.dense()
        copy = prepack.pack(plain) if prepack.packable(plain) else plain
        held[tuple(w.shape)] = (weakref.ref(w), copy)
    return copy


def kernel_for(x: torch.Tensor, w: Any) -> Any:
    """The tile kernel where it computes x @ w.T: bfloat16 rows on a CPU, at most ``MAX_ROWS``
    of them, against tiles or a plain bfloat16 CPU matrix; else None. (Called for every
    product: ~1 us, the cheapest tests first.)"""
    if not (x.is_cpu and x.dtype == torch.bfloat16 and x.dim() >= 2 and x.stride(-1) == 1):
        return None
    if type(w) is not TilePacked and not (isinstance(w, torch.Tensor) and w.is_cpu and w.dtype == torch.bfloat16
                                          and w.dim() == 2 and w.stride(-1) == 1 and not w.is_mkldnn):
        return None
    if x.numel() > MAX_ROWS * x.shape[-1]:
        return None
    return kernels.load("linear")


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
