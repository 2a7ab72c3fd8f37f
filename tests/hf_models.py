"""Small random-weight transformers models of every supported family, saved as
safetensors dirs, for parity tests."""
from __future__ import annotations

import os

import torch

V = 256  # vocab

BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=160, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)

OPT_BASE = dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=160,
                max_position_embeddings=256, word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "opt": ("OPTConfig", OPT_BASE),
    # opt-350m's layout: narrow embeddings projected in/out, post-LN, no final LN
    "opt350m": ("OPTConfig", dict(vocab_size=V, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  ffn_dim=160, max_position_embeddings=256, word_embed_proj_dim=32,
                                  do_layer_norm_before=False, bos_token_id=1, eos_token_id=2,
                                  pad_token_id=0)),
    "llama_gqa": ("LlamaConfig", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(BASE, num_key_value_heads=4, tie_word_embeddings=True,
                                       rms_norm_eps=1e-5)),
    "llama3_rope": ("LlamaConfig", dict(BASE, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear_rope": ("LlamaConfig", dict(BASE, num_key_value_heads=2, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    # the original window is 24 positions so decoding crosses it
    "dynamic_rope": ("LlamaConfig", dict(BASE, num_key_value_heads=2, max_position_embeddings=24,
                                         rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0,
                                                              factor=2.0))),
    "yarn_rope": ("LlamaConfig", dict(BASE, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                           original_max_position_embeddings=32))),
    "mistral": ("MistralConfig", dict(BASE, num_key_value_heads=2, head_dim=16, sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True)),
    # a window on the layers from max_window_layers on only (here layers 1 and 2 of 3)
    "qwen2_window": ("Qwen2Config", dict(BASE, num_key_value_heads=2, tie_word_embeddings=False,
                                         use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    # LayerNorms without weight or bias; a pre-LN OPT without its final LayerNorm
    "opt_plain_ln": ("OPTConfig", dict(OPT_BASE, layer_norm_elementwise_affine=False)),
    "opt_no_final_ln": ("OPTConfig", dict(OPT_BASE, _remove_final_layer_norm=True)),
    # Qwen3: a norm over each head's q and k; Qwen3-0.6B's heads of 128 (two query heads a
    # K/V head: what the decode kernels handle) though hidden_size / heads is 16
    "qwen3": ("Qwen3Config", dict(BASE, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False)),
    # tied, with attention_bias (q, k, v and o biases) and a window from layer 1 on
    "qwen3_window": ("Qwen3Config", dict(BASE, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                         attention_bias=True, use_sliding_window=True, sliding_window=8,
                                         max_window_layers=1)),
    # SmolLM2's head layout (3 query heads a K/V head, head size 64): what the CPU decode kernel handles
    "llama_d64": ("LlamaConfig", dict(BASE, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                                      head_dim=64)),
}


def make_hf_model(name: str, directory: str, seed: int = 0) -> torch.nn.Module:
    """Build, randomise and save one model; weights are larger than HF's init so
    the greedy path is not a constant token."""
    import transformers
    cls_name, kw = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if "norm" in pname and "bias" not in pname else 0.0
                p.copy_(base + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.5 / p.shape[-1] ** 0.5))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return model
