"""Resident CPU weights kept in oneDNN's own blocked layout.

A plain ``F.linear`` on a CPU has oneDNN reorder a bfloat16 weight into its
blocked (AMX / VNNI) layout on every call. For a layer that stays on the
compute device that work is the same every time, so it is done once at load:
the packed tensor is what the model's ``linear`` receives. Measured on the AMX
dev box, SmolLM2's 256-row decode matmuls run 1.3-1.9x faster, bit-identical
to the plain call.

float32 products go through oneDNN too, packed or plain: a plain float32
``F.linear`` runs MKL, whose sums oneDNN would not reproduce bit for bit, so
every float32 CPU product takes the oneDNN call and placements agree. On an
AVX2 machine (2-core EPYC) SmolLM2's 256-row decode step ran 5-8 % faster so.

The same oneDNN call also takes an epilogue: an MLP's activation (OPT's) and the
residual adds run inside their matmuls, rounded once, instead of as passes of
their own over the product (a gated MLP's gate and up are one product instead,
models/base.py ``linear_gated``). Plain weights (streamed ones) go through the
same call, so every placement of a layer computes the same bits.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import torch

PACKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def available(dtype: torch.dtype) -> bool:
    """Whether this torch build can pack and run a ``dtype`` weight (tried once on a tiny one)."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(16, 32, dtype=dtype)
        x = torch.ones(2, 32, dtype=dtype)
        return bool(torch.equal(packed_linear(x, pack(w)), torch.nn.functional.linear(x, w)))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def packable(t: torch.Tensor) -> bool:
    """A 2-D matmul weight on the CPU at a dtype oneDNN packs."""
    return t.device.type == "cpu" and t.dim() == 2 and available(t.dtype)


def pack(t: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(t.contiguous())


def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


# Activations oneDNN can apply to a product before rounding it: (post-op, algorithm).
FUSED_ACTIVATIONS = {"silu": ("swish", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"),
                     "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh")}


def fuses(x: torch.Tensor, w: Any) -> bool:
    """Whether ``x @ w.T`` runs through oneDNN with its epilogue fused in: a packed weight,
    or a plain one at a packable dtype on the CPU. Plain and packed weights then round
    alike, so streamed and resident layers still compute the same bits."""
    if not isinstance(w, torch.Tensor):
        return False
    if w.is_mkldnn:
        return True
    return (x.device.type == "cpu" and x.dtype == w.dtype and w.dim() == 2 and w.is_contiguous()
            and epilogues_available(w.dtype))


@functools.cache
def epilogues_available(dtype: torch.dtype) -> bool:
    """Whether this build runs every fused epilogue at ``dtype`` (tried once on tiny products)."""
    if not available(dtype):
        return False
    try:
        x, w, o = torch.ones(2, 32, dtype=dtype), torch.ones(16, 32, dtype=dtype), torch.ones(2, 16, dtype=dtype)
        for act in FUSED_ACTIVATIONS:
            linear_act(x, w, None, act)
        return linear_binary(x, o, w, None, "add").shape == (2, 16)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def linear_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x @ w.T + b) in one pass, rounded once."""
    attr, algorithm = FUSED_ACTIVATIONS[act]
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algorithm)


def linear_binary(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                  op: str) -> torch.Tensor:
    """(x @ w.T + b) ``op`` other (oneDNN's binary post-op: "add", "mul", ...), in one pass, rounded once."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, other.contiguous(), w, b, op)


class PackedRows:
    """A [V, E] matrix (an LM head) kept as packed slices of ``rows`` rows, for products
    with one slice at a time: the greedy head reads the vocabulary in slices, and a plain
    slice would be reordered into oneDNN's layout on every call (3 of SmolLM2's 14 ms a
    decode step at 256 rows). Rows cannot be gathered from it; a tied embedding keeps its own."""

    is_mkldnn = False

    def __init__(self, t: torch.Tensor, rows: int):
        self.shape, self.dtype, self.device, self.rows = t.shape, t.dtype, t.device, rows
        self.parts = [pack(t[s:s + rows]) for s in range(0, t.shape[0], rows)]
        self.nbytes = math.prod(t.shape) * t.element_size()

    def slices(self) -> Iterator[tuple[int, torch.Tensor]]:
        return ((i * self.rows, p) for i, p in enumerate(self.parts))


def row_slices(w: Any, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, slice) over a matrix's rows in slices of ``rows``, or a PackedRows' own
    slices (packed at load with the engine's size)."""
    if isinstance(w, PackedRows):
        return w.slices()
    return ((s, w[s:s + rows]) for s in range(0, w.shape[0], rows))
