"""Qwen3: a Llama with an RMSNorm over each head's queries and keys (before RoPE).

Its config.json reads as transformers' Qwen3Config reads it, the per-head norm rounds as
Qwen3RMSNorm does, a llama.cpp-style qwen3 GGUF runs as the transformers model it was
written from, and the parity checks that other files run on a fixed list of families run
on the two random Qwen3 models of hf_models.CONFIGS (test_parity's logits-and-greedy check
covers them already: it runs every entry of CONFIGS).
"""
from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

import test_cache_dtype
import test_chunking
import test_compression
import test_fusion
import test_offload_dtype
import test_parity
import test_prepack
import test_tiered
from test_kernels import teacher_forced_logits
# the other files' module fixtures, so their checks run here with the references they expect
from test_cache_dtype import refs  # noqa: F401
from test_compression import compressed_resident  # noqa: F401
from test_gguf_models import assert_same_model
from test_offload_dtype import bf16_dirs  # noqa: F401
from test_tiered import resident  # noqa: F401
from tiergen import LLM, ModelConfig, kernels
from tiergen.models import get_model
from tiergen.models.llama import head_rms_norm

QWEN3 = ["qwen3", "qwen3_window"]   # heads of 128, untied; heads of 16, tied, biases, a window


# ------------------------------------------------------------------ config.json
# with num_key_value_heads: absent, Qwen3Config takes 32 whatever the head count (we take the head count)
SMALL = dict(vocab_size=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
             intermediate_size=8)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("fields", [
    {},                                                      # head_dim 128, context 32768: Qwen3Config's
    dict(head_dim=16, max_position_embeddings=64),
    dict(head_dim=32, num_key_value_heads=2, rms_norm_eps=1e-5),
    dict(use_sliding_window=True),                           # window 4096, from layer 28 on: none here
    dict(use_sliding_window=True, max_window_layers=1),      # window 4096 on layers 1..3
    dict(use_sliding_window=True, sliding_window=16, max_window_layers=2),
    dict(use_sliding_window=True, sliding_window=16, layer_types=SLIDING),
    dict(use_sliding_window=False, sliding_window=16, max_window_layers=0),
    dict(use_sliding_window=True, sliding_window=None, max_window_layers=0),
    dict(attention_bias=True, mlp_bias=True),                # q/k/v/o biases; the MLP never has any
    dict(tie_word_embeddings=True),
], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items() if k != "layer_types") or "defaults")
def test_config_reads_as_transformers_does(fields):
    import transformers
    ref = transformers.Qwen3Config(**dict(SMALL, **fields))
    ours = ModelConfig.from_hf(dict(SMALL, model_type="qwen3", **fields))
    assert ours.family == "llama" and ours.arch == "qwen3" and ours.qk_norm
    assert ours.head_dim == ref.head_dim and ours.max_position == ref.max_position_embeddings
    assert ours.num_kv_heads == ref.num_key_value_heads and ours.norm_eps == ref.rms_norm_eps
    assert ours.tie_word_embeddings == ref.tie_word_embeddings
    assert [ours.window(j) for j in range(4)] == [
        ref.sliding_window if t == "sliding_attention" else None for t in ref.layer_types]
    # the weights we expect are the ones transformers' model has, shape for shape
    hf = transformers.Qwen3ForCausalLM(ref)
    model = get_model(ours)
    want = model.checkpoint_shapes()
    got: dict = {}
    for name, p in hf.state_dict().items():
        g, key = model.slot(name)
        if not (ours.tie_word_embeddings and key == "lm_head"):
            got.setdefault(g, {})[key] = tuple(p.shape)
    assert got == want


def test_other_llamas_have_no_head_norms():
    for mtype in ("llama", "qwen2", "mistral"):
        cfg = ModelConfig.from_hf(dict(SMALL, model_type=mtype))
        assert not cfg.qk_norm and "q_norm" not in get_model(cfg).checkpoint_shapes()[0]


def test_gguf_metadata_reads_qwen3():
    meta = {"general.architecture": "qwen3", "qwen3.block_count": 2, "qwen3.context_length": 64,
            "qwen3.embedding_length": 64, "qwen3.feed_forward_length": 128, "qwen3.attention.head_count": 4,
            "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 32, "qwen3.vocab_size": 96}
    cfg = ModelConfig.from_gguf(meta)
    assert cfg.arch == "qwen3" and cfg.qk_norm and cfg.head_dim == 32 and not cfg.qkv_bias
    qwen2 = {k.replace("qwen3", "qwen2"): v for k, v in meta.items()}
    assert not ModelConfig.from_gguf(dict(qwen2, **{"general.architecture": "qwen2"})).qk_norm


# ------------------------------------------------------------ the per-head norm
@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_norm_rounds_as_qwen3_rmsnorm(dtype, use_kernels, monkeypatch):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    if not use_kernels:
        monkeypatch.setenv("TIERGEN_KERNELS", "0")
    g = torch.Generator().manual_seed(0)
    N, H, Hkv, D = 37, 4, 2, 128
    qkv = (torch.randn(N, (H + 2 * Hkv) * D, generator=g) * 3).to(dtype)   # the fused product's rows
    q, k = qkv[:, :H * D].view(N, H, D), qkv[:, H * D:(H + Hkv) * D].view(N, Hkv, D)
    for x in (q, k):
        norm = Qwen3RMSNorm(D, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.2 * torch.randn(D, generator=g))
            want = norm(x)
        got = head_rms_norm(x, norm.weight.detach(), 1e-6)
        assert got.shape == x.shape and got.dtype == dtype
        fast = kernels.for_bf16("rowwise", x.reshape(-1, D), norm.weight) is not None
        if not fast:
            assert torch.equal(got, want)
        else:   # the kernel's roundings; only the order of each row's sum of squares differs
            assert (got == want).float().mean() > 0.999
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=0)


@pytest.mark.parametrize("name", QWEN3)
def test_bf16_logits_are_as_close_to_float32_as_transformers_bf16(name, hf_model_dirs):
    """bfloat16 compute (fast row kernels and attention kernels where they serve): as far from
    the float32 reference as transformers' own bfloat16 run is, prefill and decode."""
    hf, path = hf_model_dirs(name)
    ids, tokens = test_parity.PROMPT, [5, 77, 3, 140, 9, 200, 41, 18, 66, 2, 90, 250]
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        x = torch.tensor([ids + tokens])
        ref = hf(x).logits[0, len(ids) - 1:-1].double()
        ref16 = hf16(x).logits[0, len(ids) - 1:-1].double()
    llm = LLM(path, dtype="bfloat16", batch_size=1)
    prefill, _ = test_parity.our_step_logits(llm, ids, 1)
    ours = torch.cat([prefill[-1:], teacher_forced_logits(llm, ids, tokens[:-1])]).double()
    err, err_hf = (ours - ref).abs().max().item(), (ref16 - ref).abs().max().item()
    assert err <= 1.5 * err_hf + 1e-3, (err, err_hf)


# ------------------------------------------------- the other files' parity checks
# Their families are fixed lists in files of their own; the same checks run here on Qwen3.

@pytest.mark.parametrize("name", QWEN3)
def test_score_matches_transformers(name, hf_model_dirs):
    test_parity.test_score_matches_transformers(name, hf_model_dirs)


@pytest.mark.parametrize("name", QWEN3)
def test_batched_mixed_lengths_equal_one_by_one(name, hf_model_dirs):
    test_parity.test_batched_mixed_lengths_equal_one_by_one(name, hf_model_dirs)


@pytest.mark.parametrize("policy", list(test_tiered.GRID))
@pytest.mark.parametrize("name", QWEN3)
def test_policy_matches_resident(name, policy, resident, tmp_path, device):  # noqa: F811
    test_tiered.test_policy_matches_resident(name, policy, resident, tmp_path, device)


# Not on the heads of 128: the check's 1e-4 on prefill logits holds only while no key or value
# lands on the other side of a bfloat16 rounding than in transformers, and a relative 1e-7 on
# q_proj/k_proj (an ulp of the products) already moves transformers' own logits by up to 2e-3
# there, by up to 3e-4 on the 16-wide heads of llama_gqa, qwen2 and qwen3_window.
def test_bf16_cache_matches_transformers_with_a_rounded_cache(hf_model_dirs, device):
    test_cache_dtype.test_bf16_cache_matches_transformers_with_a_rounded_cache("qwen3_window", hf_model_dirs, device)


@pytest.mark.parametrize("placement", list(test_cache_dtype.PLACEMENTS))
def test_bf16_cache_gives_the_resident_output_on_every_placement(placement, refs, tmp_path, device):  # noqa: F811
    test_cache_dtype.test_bf16_cache_gives_the_resident_output_on_every_placement(
        "qwen3_window", placement, refs, tmp_path, device)


@pytest.mark.parametrize("name", QWEN3)
def test_compressed_weights_match_transformers_on_dequantized_weights(name, hf_model_dirs, device):
    test_compression.test_compressed_weights_match_transformers_on_dequantized_weights(name, hf_model_dirs, device)


@pytest.mark.parametrize("policy", list(test_compression.WEIGHT_GRID))
def test_compressed_weights_same_output_on_every_placement(policy, compressed_resident, tmp_path, device):  # noqa: F811
    test_compression.test_compressed_weights_same_output_on_every_placement(
        "qwen3", policy, compressed_resident, tmp_path, device)


@pytest.mark.parametrize("policy", list(test_compression.CACHE_GRID))
def test_compressed_cache_same_output_on_every_placement(policy, compressed_resident, tmp_path, device):  # noqa: F811
    # keys grouped per channel only: the token-wise groups are the same code on other rows
    test_compression.test_compressed_cache_same_output_on_every_placement(
        "qwen3_window", "channel", policy, compressed_resident, tmp_path, device)


@pytest.mark.parametrize("placement", list(test_offload_dtype.PLACEMENTS))
def test_bf16_offloaded_weights_match_resident(placement, bf16_dirs, tmp_path, device):  # noqa: F811
    test_offload_dtype.test_bf16_offloaded_weights_match_resident("qwen3", placement, bf16_dirs, tmp_path, device)


@pytest.mark.parametrize("name", QWEN3)
def test_chunked_rows_match_whole(name, hf_model_dirs):
    test_chunking.test_chunked_rows_match_whole(name, hf_model_dirs)


@pytest.mark.parametrize("name", QWEN3)
def test_prompt_last_layer_works_on_last_positions_only(name, hf_model_dirs, monkeypatch):
    test_chunking.test_prompt_last_layer_works_on_last_positions_only(name, hf_model_dirs, monkeypatch)


@pytest.mark.parametrize("dtype", test_prepack.DTYPES)
@pytest.mark.parametrize("name", QWEN3)
def test_packed_weights_match_plain_bit_for_bit(name, dtype, hf_model_dirs, monkeypatch, tmp_path):
    test_prepack.test_packed_weights_match_plain_bit_for_bit(name, dtype, hf_model_dirs, monkeypatch, tmp_path)


@pytest.mark.parametrize("name", QWEN3)
def test_loaded_qkv_is_the_checkpoints_projections_stacked(name, hf_model_dirs):
    test_fusion.test_loaded_qkv_is_the_checkpoints_projections_stacked(hf_model_dirs, name)


# ------------------------------------------------------------------------ GGUF
V, HIDDEN, HEADS, KV, LAYERS, FFN = 96, 64, 4, 2, 2, 128

# HF module -> llama.cpp tensor name part; qwen3 keeps HF's q/k row order (no permutation)
_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
          "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def hf_qwen3(**config):
    import transformers
    cfg = transformers.Qwen3Config(vocab_size=V, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FFN,
                                   max_position_embeddings=256, **config)
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 1.5 * torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def write_qwen3_gguf(path: Path, model, key_length: bool = True) -> Path:
    """The file llama.cpp's converter writes for a Qwen3 checkpoint (no tokenizer)."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "qwen3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    if key_length:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue   # the converter writes no output.weight for a tied head
        if name in _GLOBAL:
            g = _GLOBAL[name]
        else:
            _, _, layer, *rest = name.split(".")
            g = f"blk.{layer}.{_PARTS['.'.join(rest[:-1])]}.{rest[-1]}"
        w.add_tensor(g, np.ascontiguousarray(t.float().numpy()), raw_dtype=QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("config,key_length", [
    (dict(head_dim=32, tie_word_embeddings=False), True),   # heads wider than hidden / heads
    (dict(head_dim=16, tie_word_embeddings=True), False),   # head size from hidden / heads, tied head
])
def test_qwen3_gguf_matches_transformers(tmp_path, config, key_length):
    model = hf_qwen3(**config)
    path = write_qwen3_gguf(tmp_path / "qwen3.gguf", model, key_length=key_length)
    cfg = LLM(str(path), dtype="float32").config
    assert cfg.qk_norm and cfg.head_dim == model.config.head_dim
    assert cfg.tie_word_embeddings == model.config.tie_word_embeddings
    assert_same_model(path, model)
