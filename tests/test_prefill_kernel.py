"""The prompt-attention kernel (AMX tiles, or AVX-512 BF16 dot products) computes what SDPA
does, as accurately, for every mask and layout the engine hands it, and the engine's prompt pass through it stays as close to
transformers as through SDPA."""
import pytest
import torch
import torch.nn.functional as F

from checks import attention_reference
from tiergen import LLM, kernels
from tiergen.models import attention as attn
from tiergen.models.attention import build_mask

mod = kernels.load("prefill_attention")
needs_kernel = pytest.mark.skipif(mod is None, reason="the kernel cannot be built or used here (needs a C++ "
                                  "compiler, ninja and AVX-512 BF16)")


def case(B, H, Hkv, D, T, start, seed):
    """New queries as the layer hands them ([B,T,H,D] memory seen as [B,H,T,D]), a cache longer
    than in use, row b left-padded by 3b columns of the ``start`` already cached."""
    g = torch.Generator().manual_seed(seed)
    S = start + T
    q = torch.randn(B, T, H, D, generator=g).bfloat16().transpose(1, 2)
    kbuf = torch.randn(B, Hkv, S + 7, D, generator=g).bfloat16()
    vbuf = torch.randn(B, Hkv, S + 7, D, generator=g).bfloat16()
    valid = torch.ones(B, S, dtype=torch.bool)
    for b in range(B):
        valid[b, :min(3 * b, start)] = False
    return q, kbuf[:, :, :S], vbuf[:, :, :S], build_mask(valid, start, T)


def assert_as_accurate_as_sdpa(got, q, k, v, mask, scale):
    want = attention_reference(q, k, v, mask, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    assert got.shape == sdpa.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), sdpa.float(), rtol=2 ** -6, atol=2 ** -7)
    err, err_sdpa = (got.double() - want).abs(), (sdpa.double() - want).abs()
    assert err.max() <= 1.25 * err_sdpa.max() + 2 ** -12
    assert err.mean() <= 1.05 * err_sdpa.mean() + 2 ** -16


@needs_kernel
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (12, 4, 96), (16, 2, 64)])
@pytest.mark.parametrize("T,start", [(2, 0), (16, 0), (17, 5), (64, 0), (45, 30), (150, 0)])
def test_kernel_matches_sdpa_and_reference(H, Hkv, D, T, start):
    q, k, v, mask = case(3, H, Hkv, D, T, start, seed=T * 131 + start + H)
    assert mod.supports(H, Hkv, D)
    got = mod.prefill_attention(q, k, v, mask, D ** -0.5)
    assert got.transpose(1, 2).is_contiguous()   # token-major memory: the layer's reshape is free
    assert_as_accurate_as_sdpa(got, q, k, v, mask, D ** -0.5)


@needs_kernel
@pytest.mark.parametrize("B,Hkv", [(1, 1), (1, 3), (2, 1)])
def test_few_sequences_split_their_query_blocks_between_threads(B, Hkv):
    # fewer (sequence, K/V head) pairs than two per thread: the pairs' query blocks are dealt out
    q, k, v, mask = case(B, 4 * Hkv, Hkv, 64, 300, 20, seed=B * 7 + Hkv)
    assert_as_accurate_as_sdpa(mod.prefill_attention(q, k, v, mask, 0.125), q, k, v, mask, 0.125)


@needs_kernel
def test_token_major_views_sliding_window_and_large_scores():
    # host rows are token-major [S, B, Hkv, D], attended through permuted views; a sliding window
    # hides a row's first keys; one key far above the rest must not overflow the exponentials
    S, B, Hkv, H, D = 70, 2, 2, 6, 64
    g = torch.Generator().manual_seed(3)
    tok_k = torch.randn(S, B, Hkv, D, generator=g).bfloat16()
    tok_v = torch.randn(S, B, Hkv, D, generator=g).bfloat16()
    tok_k[40] *= 40
    k, v = tok_k.permute(1, 2, 0, 3), tok_v.permute(1, 2, 0, 3)
    q = (torch.randn(B, H, S, D, generator=g) * 5).bfloat16()
    mask = build_mask(torch.ones(B, S, dtype=torch.bool), 0, S, sliding_window=20)
    got = mod.prefill_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(got.float()).all()
    assert_as_accurate_as_sdpa(got, q, k, v, mask, 0.125)


@needs_kernel
def test_rows_that_see_no_key_attend_to_nothing():
    q, k, v, mask = case(2, 4, 2, 64, 20, 0, seed=5)
    mask = mask.clone()
    mask[0, :, 3] = False      # one row of a block
    mask[1, :, 16:] = False    # a whole last, partial block
    got = mod.prefill_attention(q, k, v, mask, 0.125)
    assert (got[0, :, 3] == 0).all() and (got[1, :, 16:] == 0).all()
    keep = mask[:, 0].any(-1)                               # [B, T]: rows that see a key
    want = attention_reference(q, k, v, mask, 0.125)
    got_rows, want_rows = got.transpose(1, 2)[keep], want.transpose(1, 2)[keep]
    torch.testing.assert_close(got_rows.double(), want_rows, rtol=2 ** -6, atol=2 ** -7)


@needs_kernel
def test_attention_routes_prompts_through_the_kernel_and_the_rest_elsewhere():
    q, k, v, mask = case(2, 9, 3, 64, 12, 0, seed=7)
    assert attn.prefill_kernel(q, k, v) is mod
    torch.testing.assert_close(attn.attention(q, k, v, mask), mod.prefill_attention(q, k, v, mask, 0.125),
                               rtol=0, atol=0)
    assert not mod.supports(8, 8, 80)                                      # head size not a multiple of 32
    assert attn.prefill_kernel(q.float(), k.float(), v.float()) is None    # bfloat16 only
    q80 = torch.randn(2, 8, 12, 80).bfloat16()
    k80 = v80 = torch.randn(2, 8, 12, 80).bfloat16()
    assert attn.prefill_kernel(q80, k80, v80) is None
    torch.testing.assert_close(attn.attention(q80, k80, v80, mask).double(), attention_reference(q80, k80, v80, mask, 80 ** -0.5),
                               rtol=2 ** -6, atol=2 ** -7)


@needs_kernel
def test_engine_prompt_pass_through_the_kernel_as_accurate_as_sdpa(hf_model_dirs, monkeypatch):
    # two prompts of different lengths (the shorter left-padded); each one's next-token logits
    # against float32 transformers on that prompt alone
    hf, path = hf_model_dirs("llama_d64")
    prompts = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64, 5, 77, 3, 140, 9, 200, 41, 18, 66],
               [2, 90, 250, 4, 6, 8]]
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0, -1].double() for p in prompts]
    llm = LLM(path, dtype="bfloat16", batch_size=2)

    def prompt_logits():
        from tiergen.sequence import Sequence
        eng = llm.engine
        mb, x = eng.new_micro_batch([Sequence(i, p, 1) for i, p in enumerate(prompts)], 1)
        return eng.prefill([mb], [x])[0].double()
    used = []
    real = attn.prefill_kernel
    monkeypatch.setattr(attn, "prefill_kernel", lambda *a: used.append(real(*a) is not None) or real(*a))
    ours = prompt_logits()
    assert len(used) == llm.config.num_layers and all(used)   # every layer's prompt attention
    monkeypatch.setattr(attn, "prefill_kernel", lambda *a: None)
    sdpa = prompt_logits()
    for i, r in enumerate(ref):
        err, err_sdpa = (ours[i] - r).abs().max().item(), (sdpa[i] - r).abs().max().item()
        assert err <= 1.5 * err_sdpa + 1e-3, (i, err, err_sdpa)
