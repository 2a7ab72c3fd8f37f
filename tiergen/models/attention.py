"""Attention math shared by every family and every cache placement."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """q [B,H,T,D], k/v [B,Hkv,S,D], mask [B,1,T,S] bool (True = may attend)."""
    scale_ = q.shape[-1] ** -0.5 if scale is None else scale
    if q.device.type == "cpu" and q.shape[2] == 1:
        kernel = decode_kernel(q, k, v)
        if kernel is not None:
            return kernel.decode_attention(q, k, v, mask, scale_)
        if q.dtype == torch.float32:
            return grouped_attention(q, k, v, mask, scale)
    elif q.device.type == "cpu":
        kernel = prefill_kernel(q, k, v)
        if kernel is not None:
            return kernel.prefill_attention(q, k, v, mask, scale_)
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


# the compiled one-token kernel of each dtype (tiergen/kernels)
DECODE_KERNELS = {torch.bfloat16: "decode_attention", torch.float32: "decode_attention_f32"}


def decode_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The compiled one-token kernel where it handles these tensors, else None."""
    name = DECODE_KERNELS.get(q.dtype)
    mod = kernels.for_dtype(q.dtype, name, q, k, v) if name else None
    if mod is None or not mod.supports(q.shape[1], k.shape[1], q.shape[-1]):
        return None
    return mod


def prefill_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """The compiled many-token kernel (bfloat16, AVX-512 BF16 or AMX) where it handles these tensors, else None."""
    mod = kernels.for_bf16("prefill_attention", q, k, v)
    if mod is None or not mod.supports(q.shape[1], k.shape[1], q.shape[-1]):
        return None
    return mod


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      scale: float | None = None) -> torch.Tensor:
    """Plain softmax(q k^T * scale + mask) v, each K/V head read once for its whole query group.

    Decoding is bound by reading the cache. This form reads each cached K/V
    head once for the G query heads that share it, as two batched matmuls over
    (sequence, K/V head) pairs on views of the cache, with no copies of it: on
    a CPU that is faster than SDPA's kernels for one query per sequence.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    # query heads h = j*G + g use K/V head j: group them as G*T rows per (b, j)
    qg = (q * scale).reshape(B * Hkv, G * T, D)
    scores = torch.bmm(qg, k.reshape(B * Hkv, S, D).transpose(1, 2))       # [B*Hkv, G*T, S]
    scores.view(B, Hkv, G, T, S).masked_fill_(~mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.bmm(probs, v.reshape(B * Hkv, S, D)).view(B, H, T, D)


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
