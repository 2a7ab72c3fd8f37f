"""Bytes a policy needs on each tier, computed before anything is allocated.

weight_demand: the weights' homes plus the compute-side buffers that streamed
layers pass through (two layers in flight when overlapping), and on a CPU the
packed copy of a tied LM head. block_demand: one
block's KV cache homes, the working buffers of host/disk cache rows (with
overlap, CACHE_LOOKAHEAD of them prefetched), the activations, and the largest
transient of a forward pass (prefill attention scores, the MLP intermediate or
the logits).
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .kv_cache import cache_bytes
from .models.base import Model
from .policy import Policy, split_rows
from .schedule import CACHE_LOOKAHEAD
from .weights.tiered import packs_head, placement_bytes, stored_dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def weight_demand(model: Model, dtype: torch.dtype, policy: Policy, device: torch.device,
                  store: torch.dtype | None = None) -> dict[str, dict[str, int]]:
    quant = policy.weight_quant if policy.compress_weight else None
    placed = placement_bytes(model, dtype, policy.shares("w"), quant, store)
    k = 2 if policy.overlap else 1
    # the head stays acquired while the layers stream past it (engine.forward)
    in_flight = max(placed["max_streamed_group"] * k, placed["streamed_head"] + placed["max_streamed_layer"] * k)
    demand = {"gpu": {"weights": placed["gpu"], "streamed weight buffers": in_flight,
                      "dequantized weights": placed["max_dequantized_group"]},
              "cpu": {"weights": placed["cpu"]},
              "disk": {"weights": placed["disk"]}}
    if device.type == "cuda":
        demand["cpu"]["weight staging buffers"] = in_flight
    for tier in ("gpu", "cpu"):   # a tied head's packed copy beside the embedding
        if packs_head(tier, stored_dtype(False, tier, dtype, store), False, dtype, device):
            demand[tier]["packed LM head"] = placed[f"shared_head_{tier}"]
    return demand


# weight_demand's parts that exist only while a pass runs: a block's check counts them too,
# since the weights' homes are already allocated (Tier.current) by then but these are not
PASS_WEIGHT_PARTS = ("streamed weight buffers", "dequantized weights", "weight staging buffers")


def pass_weight_demand(weights: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The parts of a weight_demand that a forward pass allocates (PASS_WEIGHT_PARTS)."""
    return {t: {k: v for k, v in items.items() if k in PASS_WEIGHT_PARTS} for t, items in weights.items()}


def merged(*demands: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Several demands (tier -> what -> bytes) as one, same-named items added."""
    out: dict[str, dict[str, int]] = {}
    for d in demands:
        for tier, items in d.items():
            for k, v in items.items():
                out.setdefault(tier, {})[k] = out.get(tier, {}).get(k, 0) + v
    return out


def block_demand(cfg: ModelConfig, dtype: torch.dtype, policy: Policy, device: torch.device,
                 rows: int, num_micro_batches: int, prompt_width: int, new_tokens: int) -> dict[str, dict[str, int]]:
    it = _itemsize(dtype)
    max_len = prompt_width + new_tokens
    quant = policy.cache_quant if policy.compress_cache else None
    kv_dt = policy.kv_dtype(dtype)
    homes = cache_bytes(cfg, rows, max_len, kv_dt, policy.shares("cache"), quant)
    g, c, d = split_rows(rows, policy.shares("cache"))
    streamed_rows = d + (c if device.type == "cuda" and not policy.cpu_attention else 0)
    # the current micro-batch's layer-prefix and, with overlap, the ones prefetched ahead, as stored
    in_flight = 1 + (min(CACHE_LOOKAHEAD, cfg.num_layers * num_micro_batches) if policy.overlap else 0)
    work = in_flight * cache_bytes(cfg, streamed_rows, max_len, kv_dt, (1.0, 0.0, 0.0), quant)["gpu"] \
        // cfg.num_layers
    # a compressed cache, or one stored narrower, is read back per micro-batch for attention
    dense_kv = 2 * rows * max_len * cfg.num_kv_heads * cfg.head_dim * it if quant or kv_dt != dtype else 0
    ag, ac, _ = split_rows(rows, policy.shares("act"))
    act_row = prompt_width * cfg.hidden_size * it
    scores = rows * cfg.num_heads * prompt_width * prompt_width * 4
    mlp = 3 * rows * prompt_width * max(cfg.ffn_dim, cfg.hidden_size) * it
    logits = rows * cfg.vocab_size * 4 * 2
    K = num_micro_batches
    return {
        "gpu": {"KV cache": K * homes["gpu"], "KV cache working buffers": work,
                "KV read back for attention": dense_kv, "activations": K * ag * act_row,
                "compute scratch": max(scores, mlp, logits)},
        "cpu": {"KV cache": K * homes["cpu"], "activations": K * ac * act_row},
        "disk": {"KV cache": K * homes["disk"]},
    }
