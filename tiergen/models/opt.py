"""OPT math, every size from 125m to 175b.

opt-350m differs from the rest: its embeddings are 512-wide with projections in
and out of the 1024-wide trunk, and it normalises after each residual add
(post-LN) with no final layer norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from .base import (Family, LayerKV, NameMap, StepContext, Weights, activation, join_rows, linear, linear_act, linear_add,
                   register, row_chunks, rows_after_attention)

# Learned position embeddings are offset by 2 (a fairseq legacy).
POSITION_OFFSET = 2

_L = r"(?:model\.)?decoder\.layers\.(?P<i>\d+)\."
_D = r"(?:model\.)?decoder\."
_NAMES = NameMap([
    (_D + r"embed_tokens\.weight", "embed", "tok"),
    (_D + r"embed_positions\.weight", "embed", "pos"),
    (_D + r"project_in\.weight", "embed", "proj_in"),
    (_D + r"final_layer_norm\.weight", "head", "norm_w"),
    (_D + r"final_layer_norm\.bias", "head", "norm_b"),
    (_D + r"project_out\.weight", "head", "proj_out"),
    (r"lm_head\.weight", "head", "lm_head"),
] + [(_L + rf"self_attn\.{p}_proj\.{t}", "layer", f"{'w' if t == 'weight' else 'b'}{p[0]}")
     for p in ("q", "k", "v", "out") for t in ("weight", "bias")] + [
    (_L + r"self_attn_layer_norm\.weight", "layer", "ln1_w"),
    (_L + r"self_attn_layer_norm\.bias", "layer", "ln1_b"),
    (_L + r"final_layer_norm\.weight", "layer", "ln2_w"),
    (_L + r"final_layer_norm\.bias", "layer", "ln2_b"),
    (_L + r"fc1\.weight", "layer", "fc1_w"),
    (_L + r"fc1\.bias", "layer", "fc1_b"),
    (_L + r"fc2\.weight", "layer", "fc2_w"),
    (_L + r"fc2\.bias", "layer", "fc2_b"),
])


@register("opt")
class OPT(Family):
    fusion = {"w_qkv": ("wq", "wk", "wv"), "b_qkv": ("bq", "bk", "bv")}   # one product (weights/fusion.py)

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.act = activation(cfg.activation)
        self.has_final_norm = cfg.do_layer_norm_before and cfg.final_norm
        self.projected = cfg.word_embed_proj_dim != cfg.hidden_size

    def slot(self, hf_name: str):
        return _NAMES(hf_name)

    def checkpoint_shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        c = self.cfg
        h, e, f = c.hidden_size, c.word_embed_proj_dim, c.ffn_dim
        layer: dict[str, tuple[int, ...]] = {}
        for p in "qkvo":
            layer[f"w{p}"] = (h, h)
            if c.qkv_bias:
                layer[f"b{p}"] = (h,)
        norm = {"w": (h,), "b": (h,)} if c.norm_affine else {}   # non-affine: no weight, no bias
        layer |= {f"{n}_{t}": s for n in ("ln1", "ln2") for t, s in norm.items()}
        layer |= {"fc1_w": (f, h), "fc2_w": (h, f)}
        if c.mlp_bias:
            layer |= {"fc1_b": (f,), "fc2_b": (h,)}
        embed = {"tok": (c.vocab_size, e), "pos": (c.max_position + POSITION_OFFSET, h)}
        head: dict[str, tuple[int, ...]] = {}
        if self.projected:
            embed["proj_in"] = (h, e)
            head["proj_out"] = (e, h)
        if self.has_final_norm:
            head |= {f"norm_{t}": s for t, s in norm.items()}
        if not c.tie_word_embeddings:
            head["lm_head"] = (c.vocab_size, e)
        out: dict[str | int, dict[str, tuple[int, ...]]] = {"embed": embed, "head": head}
        out.update({i: layer for i in range(c.num_layers)})
        return out

    def prepare(self, ctx: StepContext) -> None:
        pass

    def embed(self, w: Weights, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        x = w["tok"][ids]
        if self.projected:
            x = linear(x, w["proj_in"])
        return x + w["pos"][ctx.positions + POSITION_OFFSET]

    def _ln(self, x: torch.Tensor, w: Weights, name: str) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w.get(f"{name}_w"), w.get(f"{name}_b"), self.cfg.norm_eps)

    def layer(self, w: Weights, x: torch.Tensor, ctx: StepContext, kv: LayerKV) -> torch.Tensor:
        c = self.cfg
        pre = c.do_layer_norm_before
        B, T, E = x.shape
        rows = x.reshape(B * T, E)
        chunks = row_chunks(B * T, ctx.chunk_rows)
        # Token-wise work runs chunk by chunk; only attention needs every token at once.
        qkv = join_rows([linear(self._ln(rows[r], w, "ln1") if pre else rows[r], w["w_qkv"], w.get("b_qkv"))
                         for r in chunks])
        q, k, v = (t.view(B, T, c.num_heads, c.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
        o, res, T = rows_after_attention(kv.attend(q, k, v, ctx).transpose(1, 2), x, ctx)
        out = []
        for r in row_chunks(B * T, ctx.chunk_rows):
            y = linear_add(o[r], w["wo"], w.get("bo"), res[r])
            if not pre:
                y = self._ln(y, w, "ln1")
            h = self._ln(y, w, "ln2") if pre else y
            y = linear_add(linear_act(h, w["fc1_w"], w.get("fc1_b"), self.act), w["fc2_w"], w.get("fc2_b"), y)
            out.append(y if pre else self._ln(y, w, "ln2"))
        return join_rows(out).view(B, T, E)

    def head_features(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        if self.has_final_norm:
            x = self._ln(x, w, "norm")
        if self.projected:
            x = linear(x, w["proj_out"])
        return x
