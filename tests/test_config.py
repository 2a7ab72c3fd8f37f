"""ModelConfig: known shapes, HF config dialects, lazily generated dummy weights."""
import pytest
import torch

from tiergen import LLM, ModelConfig, SamplingParams, UnknownModelError
from tiergen.errors import CheckpointError
from tiergen.config import KNOWN_SHAPES
from tiergen.models import get_model
from tiergen.weights.dummy import dummy_group

# Published parameter counts (billions); our shapes must reproduce them.
PUBLISHED = {"opt-125m": 0.125, "opt-350m": 0.331, "opt-1.3b": 1.316, "opt-2.7b": 2.652, "opt-6.7b": 6.658,
             "opt-13b": 12.853, "opt-30b": 29.975, "opt-66b": 65.7, "opt-175b": 174.6,
             "llama-2-7b": 6.738, "llama-2-13b": 13.016, "llama-2-70b": 68.977,
             "llama-3.1-8b": 8.030, "llama-3.1-70b": 70.554, "mistral-7b": 7.248,
             "qwen2-7b": 7.616, "smollm2-135m": 0.1345}


@pytest.mark.parametrize("name", list(KNOWN_SHAPES))
def test_known_shapes_have_published_sizes(name):
    cfg = ModelConfig.from_name(name)
    assert cfg.name == name
    assert abs(cfg.num_params() / 1e9 - PUBLISHED[name]) <= 0.02 * PUBLISHED[name]
    model = get_model(cfg)
    shapes = model.shapes()
    total = sum(torch.Size(s).numel() for g in shapes.values() for s in g.values())
    assert total == cfg.num_params()


def test_unknown_name_is_refused():
    with pytest.raises(UnknownModelError):
        ModelConfig.from_name("gpt-5")
    with pytest.raises(UnknownModelError):
        LLM("not-a-model")


def test_from_hf_reads_old_and_new_rope_formats():
    base = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=8, max_position_embeddings=64)
    old = ModelConfig.from_hf(dict(base, rope_theta=5e5, rope_scaling=dict(type="linear", factor=2.0)))
    new = ModelConfig.from_hf(dict(base, rope_parameters=dict(rope_type="linear", rope_theta=5e5, factor=2.0)))
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_type == new.rope_type == "linear" and old.rope_params["factor"] == 2.0
    plain = ModelConfig.from_hf(dict(base, rope_theta=1e4))
    assert plain.rope_type == "default" and plain.num_kv_heads == 4 and plain.head_dim == 16


def test_from_hf_families():
    q = ModelConfig.from_hf(dict(model_type="qwen2", vocab_size=10, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=8,
                                 sliding_window=32, use_sliding_window=False))
    assert q.qkv_bias and q.sliding_window is None and q.num_kv_heads == 2
    m = ModelConfig.from_hf(dict(model_type="mistral", vocab_size=10, hidden_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=8, sliding_window=32))
    assert m.sliding_window == 32 and not m.qkv_bias
    assert m.window(0) == 32
    with pytest.raises(UnknownModelError):
        ModelConfig.from_hf(dict(model_type="bloom"))


QWEN2 = dict(model_type="qwen2", vocab_size=10, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=8, sliding_window=16)


def test_qwen2_slides_only_the_layers_its_config_names():
    by_default = ModelConfig.from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=2))
    assert [by_default.window(j) for j in range(4)] == [None, None, 16, 16]
    listed = ModelConfig.from_hf(dict(QWEN2, use_sliding_window=True, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]))
    assert [listed.window(j) for j in range(4)] == [16, None, 16, None]
    none_past = ModelConfig.from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=28))
    assert none_past.sliding_window is None and none_past.window(3) is None
    off = ModelConfig.from_hf(dict(QWEN2, use_sliding_window=False, max_window_layers=0))
    assert off.window(0) is None
    with pytest.raises(CheckpointError, match="layer_types"):
        ModelConfig.from_hf(dict(QWEN2, use_sliding_window=True, layer_types=["full_attention"]))


@pytest.mark.parametrize("attention_bias", [True, False])
def test_qwen2_biases_ignore_attention_bias(attention_bias):
    """Qwen2's q/k/v always carry biases and its other products never do, as in transformers."""
    q = ModelConfig.from_hf(dict(QWEN2, attention_bias=attention_bias, mlp_bias=True))
    assert q.qkv_bias and not q.o_bias and not q.mlp_bias


def test_opt_layer_norm_variants_are_read():
    base = dict(model_type="opt", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                ffn_dim=8, max_position_embeddings=64)
    assert ModelConfig.from_hf(base).norm_affine and ModelConfig.from_hf(base).final_norm
    plain = ModelConfig.from_hf(dict(base, layer_norm_elementwise_affine=False, _remove_final_layer_norm=True))
    assert not plain.norm_affine and not plain.final_norm


def test_dummy_weights_are_lazy_deterministic_and_per_layer():
    model = get_model(ModelConfig.from_name("opt-125m"))
    a = dummy_group(model, 3, seed=7, dtype=torch.float32)
    b = dummy_group(model, 3, seed=7, dtype=torch.float32)
    c = dummy_group(model, 4, seed=7, dtype=torch.float32)
    assert set(a) == set(model.checkpoint_shapes()[3])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["wq"], c["wq"])
    # one layer of opt-175b is generated alone without building the rest
    big = get_model(ModelConfig.from_name("opt-175b"))
    assert sum(torch.Size(s).numel() for s in big.shapes()[0].values()) < 2e9


def test_dummy_model_generates():
    llm = LLM("opt-125m", dummy=True, dtype="float32")
    out = llm.generate(prompt_token_ids=[[2, 100, 200]], params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4 and out[0].finish_reason == "length"
    assert all(0 <= t < llm.config.vocab_size for t in out[0].token_ids)
