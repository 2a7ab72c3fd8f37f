"""The KV cache of one micro-batch: preallocated per layer, written in place.

The model only ever calls ``cache.layer(j).attend(q, k, v, ctx)``; where the
cache lives and where attention runs is the cache's business.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .models.attention import attention
from .models.base import StepContext


class LayerCache:
    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v  # [B, Hkv, max_len, D]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ctx: StepContext) -> torch.Tensor:
        end = ctx.start + k.shape[2]
        self.k[:, :, ctx.start:end] = k
        self.v[:, :, ctx.start:end] = v
        return attention(q, self.k[:, :, :end], self.v[:, :, :end], ctx.mask)


class KVCache:
    """Keys and values for ``batch`` sequences of up to ``max_len`` cache columns."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.max_len = max_len
        self.layers = [LayerCache(torch.empty(shape, dtype=dtype, device=device),
                                  torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(cfg.num_layers)]

    def layer(self, j: int) -> LayerCache:
        return self.layers[j]

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)
