"""Attention math shared by every family and every cache placement."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """q [B,H,T,D], k/v [B,Hkv,S,D], mask [B,1,T,S] bool (True = may attend)."""
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def build_mask(key_valid: torch.Tensor, start: int, num_new: int,
               sliding_window: int | None = None) -> torch.Tensor:
    """Mask for ``num_new`` queries written at cache columns [start, start+num_new).

    key_valid [B, >=start+num_new] marks real (non-padding) cache columns. Real
    tokens of a left-padded row are contiguous, so column distance equals position
    distance and the causal / sliding-window tests can use columns directly.
    """
    total = start + num_new
    dev = key_valid.device
    q_col = torch.arange(start, total, device=dev)[:, None]
    k_col = torch.arange(total, device=dev)[None, :]
    allowed = k_col <= q_col
    if sliding_window is not None:
        allowed = allowed & (k_col > q_col - sliding_window)
    mask = allowed[None] & key_valid[:, None, :total]
    # A padding query would see no key at all (softmax of nothing = NaN); let it
    # see itself. Its output is never used and real rows never see padding keys.
    mask = mask | (q_col == k_col)[None]
    return mask[:, None]
