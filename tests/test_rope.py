"""RoPE math against Hugging Face transformers' own implementation (fp32)."""
from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import (  # noqa: E402
    LlamaRotaryEmbedding, apply_rotary_pos_emb, rotate_half)

from tiergen.config import KNOWN_SHAPES, ModelConfig  # noqa: E402
from tiergen.models.rope import (  # noqa: E402
    ROPE_TYPES, apply_rope, rope_cos_sin, rope_frequencies, rotary_dim)

TOL = 1e-5

# HF warns about unusual-but-valid parameter sets (factor None, odd keys); noise here.
logging.getLogger("transformers").setLevel(logging.ERROR)


def _configs(rope: dict[str, Any], head_dim: int = 64, max_pos: int = 2048,
             theta: float = 10000.0) -> tuple[LlamaConfig, ModelConfig]:
    """The same model described to transformers (v5 rope_parameters) and to tiergen."""
    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=head_dim, max_position_embeddings=max_pos, intermediate_size=32,
                     num_hidden_layers=1, vocab_size=32,
                     rope_parameters={"rope_theta": theta, **rope})
    # Round-trip through config.json form, the way checkpoints reach us.
    ours = ModelConfig.from_hf(hf.to_dict())
    if rope.get("partial_rotary_factor") and ours.rope_scaling is None:
        # from_hf keeps rope params only for non-default types.
        ours = ours.with_(rope_scaling=(("partial_rotary_factor", rope["partial_rotary_factor"]),))
    return hf, ours


def _hf_init(hf: LlamaConfig, seq_len: Any = None) -> tuple[torch.Tensor, float]:
    rtype = hf.rope_parameters["rope_type"]
    if rtype == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
    return ROPE_INIT_FUNCTIONS[rtype](hf, None, seq_len=seq_len)


def _hf_rotate(hf: LlamaConfig, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # A fresh module per call: HF's dynamic/longrope modules keep state across calls.
    emb = LlamaRotaryEmbedding(hf)
    cos, sin = emb(q, positions)
    qe, ke = apply_rotary_pos_emb(q, k, cos, sin)
    return cos, sin, qe, ke


def _ours_rotate(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cos, sin = rope_cos_sin(cfg, positions)
    return cos, sin, apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def _qk(positions: torch.Tensor, head_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = positions.shape
    return (torch.randn(b, 4, t, head_dim, generator=g), torch.randn(b, 2, t, head_dim, generator=g))


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _longrope_factors(head_dim: int) -> dict[str, Any]:
    n = head_dim // 2
    return {"short_factor": [1.0 + 0.05 * i for i in range(n)],
            "long_factor": [1.0 + 0.5 * i for i in range(n)]}


# (id, rope params, head_dim, max_position, theta)
CASES: list[tuple[str, dict[str, Any], int, int, float]] = [
    ("default", {"rope_type": "default"}, 64, 2048, 10000.0),
    ("default-theta5e5-d128", {"rope_type": "default"}, 128, 8192, 500000.0),
    ("linear-2", {"rope_type": "linear", "factor": 2.0}, 64, 2048, 10000.0),
    ("linear-4-d128", {"rope_type": "linear", "factor": 4.0}, 128, 4096, 1e6),
    ("dynamic-2", {"rope_type": "dynamic", "factor": 2.0}, 64, 2048, 10000.0),
    ("dynamic-1.5", {"rope_type": "dynamic", "factor": 1.5}, 64, 1024, 10000.0),
    ("yarn-4-orig32", {"rope_type": "yarn", "factor": 4.0,
                       "original_max_position_embeddings": 32}, 64, 128, 10000.0),
    ("yarn-qwen2", {"rope_type": "yarn", "factor": 4.0,
                    "original_max_position_embeddings": 32768}, 128, 131072, 1e6),
    ("yarn-mscale", {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                     "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1},
     64, 163840, 10000.0),
    ("yarn-attn-beta-notrunc", {"rope_type": "yarn", "factor": 8.0, "attention_factor": 1.3,
                                "beta_fast": 16, "beta_slow": 2, "truncate": False,
                                "original_max_position_embeddings": 512}, 64, 4096, 10000.0),
    ("yarn-factor-none", {"rope_type": "yarn", "factor": None,
                          "original_max_position_embeddings": 32}, 64, 128, 10000.0),
    ("yarn-no-orig", {"rope_type": "yarn", "factor": 2.0}, 64, 256, 10000.0),
    ("llama3.1", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     128, 131072, 500000.0),
    ("llama3.2", {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
     64, 131072, 500000.0),
    ("llama3-small", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
     64, 1024, 10000.0),
    ("longrope", {"rope_type": "longrope", "original_max_position_embeddings": 64,
                  **_longrope_factors(64)}, 64, 256, 10000.0),
    ("longrope-attn", {"rope_type": "longrope", "original_max_position_embeddings": 64,
                       "factor": 2.0, "attention_factor": 1.1, **_longrope_factors(32)},
     32, 128, 10000.0),
    ("linear-partial", {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
     64, 2048, 10000.0),
    ("yarn-partial", {"rope_type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5,
                      "original_max_position_embeddings": 64}, 64, 256, 10000.0),
    ("dynamic-partial", {"rope_type": "dynamic", "factor": 2.0, "partial_rotary_factor": 0.25},
     128, 512, 10000.0),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_frequencies_match_hf(case: tuple) -> None:
    _, rope, head_dim, max_pos, theta = case
    hf, cfg = _configs(rope, head_dim, max_pos, theta)
    ref_inv, ref_scale = _hf_init(hf)
    inv, scale = rope_frequencies(cfg)
    assert inv.dtype == torch.float32
    assert inv.shape == (rotary_dim(cfg) // 2,) == ref_inv.shape
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", [c for c in CASES if c[1]["rope_type"] in ("dynamic", "longrope")],
                         ids=[c[0] for c in CASES if c[1]["rope_type"] in ("dynamic", "longrope")])
@pytest.mark.parametrize("mult", [0.5, 1.0, 1.5, 3.0])
def test_length_dependent_frequencies_match_hf(case: tuple, mult: float) -> None:
    _, rope, head_dim, max_pos, theta = case
    hf, cfg = _configs(rope, head_dim, max_pos, theta)
    threshold = max_pos if rope["rope_type"] == "dynamic" else rope["original_max_position_embeddings"]
    seq_len = max(1, int(threshold * mult))
    # HF's runtime passes seq_len as an int64 tensor (max position + 1): bit-exact.
    ref_inv, ref_scale = _hf_init(hf, torch.tensor(seq_len))
    inv, scale = rope_frequencies(cfg, seq_len)
    assert scale == pytest.approx(ref_scale)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=0, atol=0)
    # HF's init-time python-int path computes the NTK base in float64: ~1 ulp apart.
    ref_inv_int, _ = _hf_init(hf, seq_len)
    torch.testing.assert_close(inv, ref_inv_int.float(), rtol=1e-6, atol=0)


def _positions_for(max_pos: int, rope: dict[str, Any]) -> list[torch.Tensor]:
    orig = rope.get("original_max_position_embeddings", max_pos)
    return [
        torch.arange(17)[None],                                   # short prefill
        torch.arange(orig + 5)[None],                             # just past the original length
        torch.tensor([[max_pos - 1]]),                            # decode at the end of context
        torch.tensor([[2 * max_pos + 3]]),                        # beyond the trained context
        torch.arange(min(orig, 40)).repeat(3, 1) + torch.tensor([[0], [7], [100]]),  # batch
    ]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cos_sin_and_apply_match_hf(case: tuple) -> None:
    _, rope, head_dim, max_pos, theta = case
    hf, cfg = _configs(rope, head_dim, max_pos, theta)
    seq_dependent = rope["rope_type"] in ("dynamic", "longrope")
    partial = rope.get("partial_rotary_factor")
    for positions in _positions_for(max_pos, rope):
        if seq_dependent and positions.shape[0] > 1:
            continue   # HF uses the batch max there; covered by the per-row tests below
        q, k = _qk(positions, head_dim)
        cos, sin, qe, ke = _ours_rotate(cfg, q, k, positions)
        assert cos.shape == (*positions.shape, rotary_dim(cfg)) and cos.dtype == torch.float32
        if partial:
            # Llama applies RoPE to the whole head; partial models (Phi, NeoX)
            # rotate the leading slice and pass the rest through.
            rd = rotary_dim(cfg)
            rcos, rsin, rq, rk = _hf_rotate(hf, q[..., :rd], k[..., :rd], positions)
            rq = torch.cat((rq, q[..., rd:]), dim=-1)
            rk = torch.cat((rk, k[..., rd:]), dim=-1)
        else:
            rcos, rsin, rq, rk = _hf_rotate(hf, q, k, positions)
        assert _maxdiff(cos, rcos) <= TOL and _maxdiff(sin, rsin) <= TOL, positions
        assert _maxdiff(qe, rq) <= TOL and _maxdiff(ke, rk) <= TOL, positions


def test_known_shape_llama31_matches_hf() -> None:
    cfg = KNOWN_SHAPES["llama-3.1-8b"]
    p = cfg.rope_params
    hf, _ = _configs({k: v for k, v in p.items()}, cfg.head_dim, cfg.max_position, cfg.rope_theta)
    inv, scale = rope_frequencies(cfg)
    ref, ref_scale = _hf_init(hf)
    torch.testing.assert_close(inv, ref, rtol=0, atol=0)
    positions = torch.tensor([[0, 1, 8191, 8192, 65536, 131071]])
    q, k = _qk(positions, cfg.head_dim)
    _, _, qe, ke = _ours_rotate(cfg, q, k, positions)
    _, _, rq, rk = _hf_rotate(hf, q, k, positions)
    assert _maxdiff(qe, rq) <= TOL and _maxdiff(ke, rk) <= TOL


# ------------------------------------------------------------ per-row behaviour
ROW_LENGTHS = [10, 2048, 2049, 3000, 5000]   # around dynamic-2's max_position 2048


def _left_padded_batch(lengths: list[int]) -> torch.Tensor:
    # Left padding: padded slots get position 0, real tokens 0..n-1 (right-aligned).
    width = max(lengths)
    rows = [torch.cat((torch.zeros(width - n, dtype=torch.int64), torch.arange(n))) for n in lengths]
    return torch.stack(rows)


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "original_max_position_embeddings": 2048, "factor": 2.0,
     **_longrope_factors(64)},
], ids=["dynamic", "longrope"])
def test_length_dependent_rows_are_independent(rope: dict[str, Any]) -> None:
    hf, cfg = _configs(rope, 64, 2048 if rope["rope_type"] == "dynamic" else 4096)
    positions = _left_padded_batch(ROW_LENGTHS)
    q, k = _qk(positions, 64)
    cos, sin, qe, ke = _ours_rotate(cfg, q, k, positions)
    for i, n in enumerate(ROW_LENGTHS):
        alone = positions[i:i + 1]
        c1, s1, q1, k1 = _ours_rotate(cfg, q[i:i + 1], k[i:i + 1], alone)
        assert torch.equal(cos[i:i + 1], c1) and torch.equal(sin[i:i + 1], s1)
        assert torch.equal(qe[i:i + 1], q1) and torch.equal(ke[i:i + 1], k1)
        # ... and each row alone is what HF gives at batch size 1.
        real = slice(positions.shape[1] - n, None)
        pos1 = alone[:, real]
        _, _, rq, rk = _hf_rotate(hf, q[i:i + 1, :, real], k[i:i + 1, :, real], pos1)
        assert _maxdiff(qe[i:i + 1, :, real], rq) <= TOL
        assert _maxdiff(ke[i:i + 1, :, real], rk) <= TOL


def test_dynamic_decode_steps_match_hf_batch1() -> None:
    # Prefill past max_position, then decode one token at a time: HF's module
    # grows its cached frequencies monotonically, which per-row recomputation
    # reproduces exactly for a single sequence.
    hf, cfg = _configs({"rope_type": "dynamic", "factor": 2.0}, 64, 256)
    emb = LlamaRotaryEmbedding(hf)        # one stateful module across calls, as in HF generate
    steps = [torch.arange(300)[None]] + [torch.tensor([[p]]) for p in range(300, 305)]
    for positions in steps:
        q, k = _qk(positions, 64, seed=positions.shape[1])
        rcos, rsin = emb(q, positions)
        rq, rk = apply_rotary_pos_emb(q, k, rcos, rsin)
        _, _, qe, ke = _ours_rotate(cfg, q, k, positions)
        assert _maxdiff(qe, rq) <= TOL and _maxdiff(ke, rk) <= TOL


def test_dynamic_is_stateless() -> None:
    # HF keeps the longest length's frequencies until a call drops below
    # max_position; ours depend only on the positions passed in.
    _, cfg = _configs({"rope_type": "dynamic", "factor": 2.0}, 64, 256)
    short = torch.arange(300)[None]
    before = rope_cos_sin(cfg, short)
    rope_cos_sin(cfg, torch.arange(1000)[None])
    after = rope_cos_sin(cfg, short)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# ------------------------------------------------------------------ misc
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_rope_low_precision(dtype: torch.dtype) -> None:
    _, cfg = _configs({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                      128, 131072, 500000.0)
    positions = torch.tensor([[0, 5, 4000, 100000]])
    x = torch.randn(1, 3, 4, 128).to(dtype)
    cos, sin = rope_cos_sin(cfg, positions)
    out = apply_rope(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    ref = apply_rope(x.float(), cos, sin).to(dtype)   # rotated in fp32, rounded once
    assert torch.equal(out, ref)


def test_apply_rope_partial_passes_tail_through() -> None:
    _, cfg = _configs({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5})
    positions = torch.arange(8)[None]
    x = torch.randn(1, 2, 8, 64)
    cos, sin = rope_cos_sin(cfg, positions)
    assert cos.shape[-1] == 32
    out = apply_rope(x, cos, sin)
    assert torch.equal(out[..., 32:], x[..., 32:])
    ref = x[..., :32] * cos[:, None] + rotate_half(x[..., :32]) * sin[:, None]
    assert _maxdiff(out[..., :32], ref) == 0.0


def test_position_zero_is_identity_and_norm_preserved() -> None:
    _, cfg = _configs({"rope_type": "default"})
    x = torch.randn(2, 4, 5, 64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 10, 11]])
    out = apply_rope(x, *rope_cos_sin(cfg, positions))
    torch.testing.assert_close(out[0, :, 0], x[0, :, 0])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))


def test_registry_and_errors() -> None:
    assert set(ROPE_TYPES) >= {"default", "linear", "dynamic", "yarn", "llama3", "longrope"}
    _, cfg = _configs({"rope_type": "default"})
    bad = cfg.with_(rope_scaling=(("rope_type", "no-such-rope"),))
    with pytest.raises(ValueError, match="no-such-rope"):
        rope_frequencies(bad)


def test_fixed_frequencies_cached_and_not_aliased() -> None:
    _, cfg = _configs({"rope_type": "linear", "factor": 2.0})
    a, _ = rope_frequencies(cfg)
    a.mul_(0)   # a caller scribbling on its copy must not poison the cache
    b, _ = rope_frequencies(cfg)
    assert b.abs().min() > 0


def test_unhashable_longrope_config_works() -> None:
    # from_hf stores longrope's factor lists as lists, so the config itself is
    # not hashable; caching must not depend on hashing it.
    _, cfg = _configs({"rope_type": "longrope", "original_max_position_embeddings": 64,
                       **_longrope_factors(64)}, 64, 256)
    with pytest.raises(TypeError):
        hash(cfg)
    cos, _ = rope_cos_sin(cfg, torch.arange(10)[None])
    assert cos.shape == (1, 10, 64)
