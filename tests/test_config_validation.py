"""Broken config.json / GGUF metadata / tokenizer files: one-line TiergenErrors naming the field."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from tiergen import LLM, ModelConfig
from tiergen.errors import CheckpointError, UnknownModelError
from tiergen.tokenizer import load_tokenizer

LLAMA = dict(model_type="llama", vocab_size=10, hidden_size=64, num_hidden_layers=1,
             num_attention_heads=4, intermediate_size=8, max_position_embeddings=64)
OPT = dict(model_type="opt", vocab_size=10, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
           ffn_dim=8, max_position_embeddings=64)
GGUF = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
        "llama.block_count": 1, "llama.feed_forward_length": 8, "llama.context_length": 64,
        "llama.vocab_size": 10}


def refused(match: str, cls: type[Exception] = CheckpointError) -> Any:
    """pytest.raises for a message that starts with ``match`` literally."""
    return pytest.raises(cls, match="^" + re.escape(match))


# ------------------------------------------------------------ valid ones still read
def test_valid_configs_still_read() -> None:
    llama = ModelConfig.from_hf(dict(LLAMA, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=5e5,
                                     eos_token_id=[1, 2]))
    assert (llama.num_kv_heads, llama.head_dim, llama.norm_eps, llama.rope_theta) == (2, 16, 1e-5, 5e5)
    assert llama.eos_token_ids == (1, 2)
    # null means "derive it", as transformers reads it
    derived = ModelConfig.from_hf(dict(LLAMA, num_key_value_heads=None, head_dim=None, sliding_window=None))
    assert (derived.num_kv_heads, derived.head_dim, derived.sliding_window) == (4, 16, None)
    opt = ModelConfig.from_hf(dict(OPT, word_embed_proj_dim=None, activation_function="relu"))
    assert opt.word_embed_proj_dim == 64 and opt.activation == "relu"
    yarn = ModelConfig.from_hf(dict(LLAMA, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000, factor=4.0, original_max_position_embeddings=32)))
    assert yarn.rope_type == "yarn" and yarn.rope_theta == 1e4 and yarn.context_length == 128
    gguf = ModelConfig.from_gguf(dict(GGUF, **{"llama.rope.scaling.type": "linear",
                                               "llama.rope.scaling.factor": 2.0}))
    assert gguf.head_dim == 16 and gguf.rope_type == "linear"


# ------------------------------------------------------------ config.json as a whole
def test_config_json_that_is_not_an_object(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: not a JSON object"):
        LLM(str(tmp_path))   # refused before any weight file is looked for
    with refused("config.json: not a JSON object"):
        ModelConfig.from_hf([1, 2])   # type: ignore[arg-type]


def test_model_type_of_the_wrong_type() -> None:
    with pytest.raises(UnknownModelError, match="unsupported model_type"):
        ModelConfig.from_hf(dict(LLAMA, model_type=["llama"]))


# ------------------------------------------------------------ integer fields
BAD_COUNTS = ["64", None, 0, -2, True, 8.0]


COUNTS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"]


@pytest.mark.parametrize("cfg, field", [(LLAMA, f) for f in COUNTS + ["intermediate_size"]]
                         + [(OPT, f) for f in COUNTS + ["ffn_dim"]])
@pytest.mark.parametrize("value", BAD_COUNTS)
def test_counts_must_be_positive_ints(cfg: dict, field: str, value: Any) -> None:
    with refused(f"config.json: {field} must be a positive integer, got {value!r}"):
        ModelConfig.from_hf(dict(cfg, **{field: value}))


@pytest.mark.parametrize("cfg, field", [(LLAMA, "num_key_value_heads"), (LLAMA, "head_dim"),
                                        (dict(LLAMA, model_type="mistral"), "sliding_window"),
                                        (OPT, "word_embed_proj_dim")])
@pytest.mark.parametrize("value", ["8", 0, -1, False])
def test_optional_counts_are_positive_ints_when_given(cfg: dict, field: str, value: Any) -> None:
    with refused(f"config.json: {field} must be a positive integer, got {value!r}"):
        ModelConfig.from_hf(dict(cfg, **{field: value}))


def test_zero_heads_is_named_not_divided_by() -> None:
    with refused("config.json: num_attention_heads must be a positive integer, got 0"):
        ModelConfig.from_hf(dict(LLAMA, num_attention_heads=0, head_dim=None))
    with refused("config.json: hidden_size 2 is smaller than num_attention_heads 4"):
        ModelConfig.from_hf(dict(LLAMA, hidden_size=2))


def test_missing_required_field_is_still_named() -> None:
    cfg = dict(LLAMA)
    del cfg["intermediate_size"]
    with refused("config.json lacks required field 'intermediate_size'"):
        ModelConfig.from_hf(cfg)


def test_eos_token_id_must_be_ids() -> None:
    with refused("config.json: eos_token_id must be a token id or a list of them, got ['x']"):
        ModelConfig.from_hf(dict(LLAMA, eos_token_id=["x"]))


def test_qwen2_window_fields() -> None:
    qwen = dict(LLAMA, model_type="qwen2", sliding_window=16, use_sliding_window=True)
    with refused("config.json: max_window_layers must be a non-negative integer, got '1'"):
        ModelConfig.from_hf(dict(qwen, max_window_layers="1"))
    with refused("config.json: layer_types must be a list, got 'sliding_attention'"):
        ModelConfig.from_hf(dict(qwen, layer_types="sliding_attention"))


# ------------------------------------------------------------ float fields
@pytest.mark.parametrize("value", [0, -1e-6, "1e-6", None, math.inf, math.nan, True])
def test_norm_eps_must_be_positive_finite(value: Any) -> None:
    with refused(f"config.json: rms_norm_eps must be a positive finite number, got {value!r}"):
        ModelConfig.from_hf(dict(LLAMA, rms_norm_eps=value))


@pytest.mark.parametrize("value", [0, -1.0, "1e4", math.inf, pytest.param(10 ** 400, id="huge")])
def test_rope_theta_must_be_positive_finite(value: Any) -> None:
    with refused("config.json: rope_theta must be a positive finite number"):
        ModelConfig.from_hf(dict(LLAMA, rope_theta=value))
    with refused("config.json: rope_parameters.rope_theta must be a positive finite number"):
        ModelConfig.from_hf(dict(LLAMA, rope_parameters=dict(rope_type="default", rope_theta=value)))


# ------------------------------------------------------------ rope and activation
@pytest.mark.parametrize("key, rope", [("rope_parameters", dict(rope_type="weird", rope_theta=1e4)),
                                       ("rope_scaling", dict(type="weird", factor=2.0))])
def test_unknown_rope_type_is_refused_at_read(key: str, rope: dict) -> None:
    with refused(f"config.json: {key}: unsupported rope type 'weird'; supported: default, ") as e:
        ModelConfig.from_hf(dict(LLAMA, **{key: rope}))
    assert "llama3" in str(e.value) and "yarn" in str(e.value)


def test_rope_numbers_and_shape() -> None:
    with refused("config.json: rope_scaling must be an object, got 'linear'"):
        ModelConfig.from_hf(dict(LLAMA, rope_scaling="linear"))
    with refused("config.json: rope_scaling.factor must be a positive finite number, got 'two'"):
        ModelConfig.from_hf(dict(LLAMA, rope_scaling=dict(type="linear", factor="two")))
    with refused("config.json: rope_parameters.original_max_position_embeddings must be a positive integer"):
        ModelConfig.from_hf(dict(LLAMA, rope_parameters=dict(rope_type="yarn", factor=2.0,
                                                             original_max_position_embeddings=-1)))


@pytest.mark.parametrize("cfg, field", [(LLAMA, "hidden_act"), (OPT, "activation_function")])
def test_unknown_activation_is_named_at_read(cfg: dict, field: str) -> None:
    # UnknownModelError, as get_model raised it before; now at read time and naming the field
    with refused(f"config.json: {field}: unsupported activation 'swishy'; supported: ", UnknownModelError):
        ModelConfig.from_hf(dict(cfg, **{field: "swishy"}))


# ------------------------------------------------------------ configs built in code
def test_direct_construction_is_checked_too() -> None:
    with refused("ModelConfig.num_heads must be a positive integer, got 0"):
        ModelConfig(family="llama", vocab_size=10, hidden_size=64, num_layers=1, num_heads=0, ffn_dim=8,
                    max_position=64)
    good = ModelConfig.from_hf(LLAMA)
    with refused("ModelConfig.norm_eps must be a positive finite number"):
        good.with_(norm_eps=0.0)


# ------------------------------------------------------------ GGUF metadata
@pytest.mark.parametrize("key", ["attention.head_count", "embedding_length", "block_count",
                                 "feed_forward_length", "context_length", "vocab_size",
                                 "attention.head_count_kv", "attention.key_length"])
@pytest.mark.parametrize("value", [0, -1, "64", 2.5])
def test_gguf_counts_must_be_positive_ints(key: str, value: Any) -> None:
    with refused(f"GGUF llama.{key} must be a positive integer, got {value!r}"):
        ModelConfig.from_gguf(dict(GGUF, **{f"llama.{key}": value}))


@pytest.mark.parametrize("key", ["attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"])
def test_gguf_numbers_must_be_positive_finite(key: str) -> None:
    meta = dict(GGUF, **{"llama.rope.scaling.type": "linear", f"llama.{key}": -1.0})
    with refused(f"GGUF llama.{key} must be a positive finite number, got -1.0"):
        ModelConfig.from_gguf(meta)


def test_gguf_rope_type_and_vocab() -> None:
    with refused("GGUF llama.rope.scaling.type: unsupported rope type 'weird'; supported: "):
        ModelConfig.from_gguf(dict(GGUF, **{"llama.rope.scaling.type": "weird"}))
    meta = {k: v for k, v in GGUF.items() if k != "llama.vocab_size"}
    with refused("GGUF metadata lacks llama.vocab_size and tokenizer.ggml.tokens"):
        ModelConfig.from_gguf(meta)
    assert ModelConfig.from_gguf(dict(meta, **{"tokenizer.ggml.tokens": ["a", "b"]})).vocab_size == 2


# ------------------------------------------------------------ tokenizer files
@pytest.mark.parametrize("text", ['{"version": "1.0", "model": ',                          # not JSON
                                  '{"version": "1.0", "added_tokens": [], "model": {"type": "Nope"}}',
                                  "[1, 2]"])
def test_broken_tokenizer_json_is_one_line(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "tokenizer.json").write_text(text)
    with refused(f"{tmp_path}: cannot read the tokenizer (") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value) and str(e.value).endswith(")")
