"""Whole GGUF models written as llama.cpp's converter writes them, against the transformers
model they were made from: what the metadata leaves to the tensors (rope factors, biases)
and files without a tokenizer."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from tiergen import LLM, InvalidRequestError, SamplingParams
from tiergen.errors import CheckpointError

V, HIDDEN, HEADS, KV, LAYERS, FFN = 96, 64, 4, 2, 2, 128
PROMPT = list(range(3, 3 + 40))   # long enough for scaled frequencies to matter

_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def hf_llama(**config):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, intermediate_size=FFN,
                                   max_position_embeddings=256, tie_word_embeddings=False, **config)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's converter: within a head, rows of the two rotary halves interleaved
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, meta: dict | None = None, extra: dict | None = None) -> Path:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    for key, value in (meta or {}).items():
        w.add_float32(key, value)
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            g = f"blk.{layer}.{_PARTS['.'.join(rest[:-1])]}.{rest[-1]}"
        if ".attn_q." in g or ".attn_k." in g:
            a = _permute(a, c.num_attention_heads if ".attn_q." in g else c.num_key_value_heads)
        w.add_tensor(g, np.ascontiguousarray(a), raw_dtype=QT.F32)
    for g, a in (extra or {}).items():
        w.add_tensor(g, a.astype(np.float32), raw_dtype=QT.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def assert_same_model(path: Path, model) -> None:
    llm = LLM(str(path), dtype="float32")
    ours = llm.token_logprobs([PROMPT])[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, :-1].float(), -1)
    ref = ref.gather(1, torch.tensor(PROMPT[1:])[:, None])[:, 0]
    assert (ours - ref).abs().max() <= 1e-4
    out = llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=8, ignore_eos=True))
    with torch.no_grad():
        g = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    assert out[0].token_ids == g[0, len(PROMPT):].tolist()


def test_llama3_rope_from_rope_freqs(tmp_path):
    """llama.cpp writes no rope.scaling keys for llama3, only a divisor per frequency."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    model = hf_llama(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    dim = HIDDEN // HEADS
    base = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    factors = (base / scaled).numpy()
    assert factors.max() > 1.5, "the scaling should change some frequencies"
    assert_same_model(write_gguf(tmp_path / "l3.gguf", model, extra={"rope_freqs.weight": factors}), model)


def test_rope_scale_linear_key(tmp_path):
    model = hf_llama(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))
    assert_same_model(write_gguf(tmp_path / "lin.gguf", model, meta={"llama.rope.scale_linear": 4.0}), model)


def test_llama_with_attention_biases(tmp_path):
    """The metadata has no bias flag: the tensors say so (q/k biases permuted like their rows)."""
    model = hf_llama(attention_bias=True)
    assert_same_model(write_gguf(tmp_path / "bias.gguf", model), model)


def test_gguf_without_tokenizer_runs_on_token_ids(tmp_path):
    model = hf_llama()
    path = write_gguf(tmp_path / "ids.gguf", model)
    assert_same_model(path, model)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        LLM(str(path), dtype="float32").generate(["text"])


def test_rope_freqs_of_the_wrong_size_is_refused(tmp_path):
    model = hf_llama()
    path = write_gguf(tmp_path / "bad.gguf", model, extra={"rope_freqs.weight": np.ones(3)})
    with pytest.raises(CheckpointError, match="rope_freqs"):
        LLM(str(path))
