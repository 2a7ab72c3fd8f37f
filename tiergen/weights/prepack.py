"""Resident CPU weights kept in oneDNN's own blocked layout.

A plain bfloat16 ``F.linear`` on a CPU has oneDNN reorder the whole weight into
its blocked (AMX / VNNI) layout on every call. For a layer that stays on the
compute device that work is the same every time, so it is done once at load:
the packed tensor is what the model's ``linear`` receives. Measured on the AMX
dev box, SmolLM2's 256-row decode matmuls run 1.3-1.9x faster, bit-identical
to the plain call. float32 is left alone: it goes through MKL, whose results a
oneDNN kernel would not reproduce bit for bit.
"""
from __future__ import annotations

import functools

import torch

PACKED_DTYPES = (torch.bfloat16, torch.float16)


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
