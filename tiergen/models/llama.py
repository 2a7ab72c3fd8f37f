"""Llama-family math: Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2 (RMSNorm, RoPE, GQA, SwiGLU;
Qwen3's RMSNorm over each head's queries and keys)."""
from __future__ import annotations

import torch

from .. import kernels
from ..config import ModelConfig
from .base import (Family, LayerKV, NameMap, StepContext, Weights, activation, join_rows, linear, linear_add,
                   linear_gated, register, row_chunks, rows_after_attention)
from .rope import apply_rope_into, rope_cos_sin

_L = r"(?:model\.)?layers\.(?P<i>\d+)\."
_NAMES = NameMap([
    (r"(?:model\.)?embed_tokens\.weight", "embed", "tok"),
    (_L + r"input_layernorm\.weight", "layer", "attn_norm"),
    (_L + r"self_attn\.q_proj\.weight", "layer", "wq"),
    (_L + r"self_attn\.k_proj\.weight", "layer", "wk"),
    (_L + r"self_attn\.v_proj\.weight", "layer", "wv"),
    (_L + r"self_attn\.o_proj\.weight", "layer", "wo"),
    (_L + r"self_attn\.q_proj\.bias", "layer", "bq"),
    (_L + r"self_attn\.k_proj\.bias", "layer", "bk"),
    (_L + r"self_attn\.v_proj\.bias", "layer", "bv"),
    (_L + r"self_attn\.o_proj\.bias", "layer", "bo"),
    (_L + r"self_attn\.q_norm\.weight", "layer", "q_norm"),
    (_L + r"self_attn\.k_norm\.weight", "layer", "k_norm"),
    (_L + r"post_attention_layernorm\.weight", "layer", "ffn_norm"),
    (_L + r"mlp\.gate_proj\.weight", "layer", "w_gate"),
    (_L + r"mlp\.up_proj\.weight", "layer", "w_up"),
    (_L + r"mlp\.down_proj\.weight", "layer", "w_down"),
    (_L + r"mlp\.gate_proj\.bias", "layer", "b_gate"),
    (_L + r"mlp\.up_proj\.bias", "layer", "b_up"),
    (_L + r"mlp\.down_proj\.bias", "layer", "b_down"),
    (r"(?:model\.)?norm\.weight", "head", "norm"),
    (r"lm_head\.weight", "head", "lm_head"),
])


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the gain, as the reference does.
    fast = kernels.for_bf16("rowwise", x, w) if x.dim() == 2 else None
    if fast is not None:   # the same roundings in one pass (tiergen/kernels/rowwise.cpp)
        return fast.rms_norm(x, w, eps)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype)
    # y is a fresh temporary: scale it in place rather than allocate another
    return y.mul_(w) if w.dtype == y.dtype else w * y


def head_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm`` over the last dim of token-major heads x [N, H, D] with one gain w [D]
    for every head; a fresh [N, H, D]. The heads go through as rows of one [N*H, D] matrix
    (the 2-D shape the fast bfloat16 kernel takes); x, a strided view of the fused Q/K/V
    product, is copied once to make them."""
    N, H, D = x.shape
    return rms_norm(x.reshape(N * H, D), w, eps).view(N, H, D)


@register("llama")
class Llama(Family):
    # one product for Q, K and V, one for the MLP's gate and up (weights/fusion.py)
    fusion = {"w_qkv": ("wq", "wk", "wv"), "b_qkv": ("bq", "bk", "bv"),
              "w_gate_up": ("w_gate", "w_up"), "b_gate_up": ("b_gate", "b_up")}

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.act = activation(cfg.activation)

    def slot(self, hf_name: str):
        return _NAMES(hf_name)

    def checkpoint_shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        c = self.cfg
        h, q, kv, f = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.ffn_dim
        layer = {"attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
                 "ffn_norm": (h,), "w_gate": (f, h), "w_up": (f, h), "w_down": (h, f)}
        if c.qkv_bias:
            layer |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
        if c.o_bias:
            layer["bo"] = (h,)
        if c.qk_norm:
            layer |= {"q_norm": (c.head_dim,), "k_norm": (c.head_dim,)}
        if c.mlp_bias:
            layer |= {"b_gate": (f,), "b_up": (f,), "b_down": (h,)}
        head = {"norm": (h,)}
        if not c.tie_word_embeddings:
            head["lm_head"] = (c.vocab_size, h)
        out: dict[str | int, dict[str, tuple[int, ...]]] = {"embed": {"tok": (c.vocab_size, h)}, "head": head}
        out.update({i: layer for i in range(c.num_layers)})
        return out

    def prepare(self, ctx: StepContext) -> None:
        cos, sin = rope_cos_sin(self.cfg, ctx.positions)      # [B, T, rd]
        # token-major rows [B*T, 1, rd]: the layer works on flattened tokens
        ctx.extra["rope"] = (cos.flatten(0, 1)[:, None], sin.flatten(0, 1)[:, None])

    def embed(self, w: Weights, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return w["tok"][ids]

    def layer(self, w: Weights, x: torch.Tensor, ctx: StepContext, kv: LayerKV) -> torch.Tensor:
        c = self.cfg
        B, T, E = x.shape
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        n = B * T
        rows = x.reshape(n, E)
        chunks = row_chunks(n, ctx.chunk_rows)
        cos, sin = ctx.extra["rope"]
        # Token-wise work runs chunk by chunk; only attention needs every token at once.
        # New keys and values go straight into the cache where it offers its memory.
        q = x.new_empty(n, H, D)
        k, v = kv.new_rows(ctx.start, T) or (x.new_empty(n, Hkv, D), x.new_empty(n, Hkv, D))
        for r in chunks:
            h = rms_norm(rows[r], w["attn_norm"], c.norm_eps)
            qr, kr, vr = linear(h, w["w_qkv"], w.get("b_qkv")).split((H * D, Hkv * D, Hkv * D), -1)
            qr, kr = qr.view(-1, H, D), kr.view(-1, Hkv, D)
            if c.qk_norm:   # Qwen3: each head's query and key normalised, before RoPE
                qr = head_rms_norm(qr, w["q_norm"], c.norm_eps)
                kr = head_rms_norm(kr, w["k_norm"], c.norm_eps)
            apply_rope_into(qr, cos[r], sin[r], q[r])
            apply_rope_into(kr, cos[r], sin[r], k[r])
            v[r] = vr.view(-1, Hkv, D)
        heads = (q.view(B, T, H, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
                 v.view(B, T, Hkv, D).transpose(1, 2))
        o, res, T = rows_after_attention(kv.attend(*heads, ctx).transpose(1, 2), x, ctx)
        out = []
        for r in row_chunks(B * T, ctx.chunk_rows):
            y = linear_add(o[r], w["wo"], w.get("bo"), res[r])
            h = rms_norm(y, w["ffn_norm"], c.norm_eps)
            g = linear_gated(h, w["w_gate_up"], w.get("b_gate_up"), self.act)
            out.append(linear_add(g, w["w_down"], w.get("b_down"), y))
        return join_rows(out).view(B, T, E)

    def head_features(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, w["norm"], self.cfg.norm_eps)
