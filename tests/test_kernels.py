"""The compiled CPU kernels compute what the torch code does: decode attention (bfloat16 and
float32), RMSNorm, RoPE, the gated SiLU and the greedy head's running argmax."""
import pytest
import torch
import torch.nn.functional as F

from checks import attention_reference
from tiergen import LLM, SamplingParams, kernels
from tiergen.models import attention as attn

mod = kernels.load("decode_attention")
needs_attn = pytest.mark.skipif(mod is None, reason="the kernel cannot be built here (needs a C++ compiler, "
                                "ninja and AVX-512 BF16)")


def case(B, H, Hkv, D, S, cap, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=g).to(dtype).transpose(1, 2)      # the engine's strided view
    kbuf = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)               # a cache longer than in use
    vbuf = torch.randn(B, Hkv, cap, D, generator=g).to(dtype)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    for b in range(B):                                                       # left padding, row b: b keys
        mask[b, ..., :min(b, S - 1)] = False
    return q, kbuf[:, :, :S], vbuf[:, :, :S], mask


@needs_attn
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (14, 2, 64), (32, 4, 128), (12, 4, 96)])
@pytest.mark.parametrize("S", [1, 15, 16, 17, 70])
def test_kernel_matches_reference(H, Hkv, D, S):
    q, k, v, mask = case(5, H, Hkv, D, S, S + 9, seed=S * 31 + H)
    assert mod.supports(H, Hkv, D)
    got = mod.decode_attention(q, k, v, mask, D ** -0.5)
    want = attention_reference(q, k, v, mask, D ** -0.5)
    assert got.shape == (5, H, 1, D) and got.dtype == torch.bfloat16
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
    torch.testing.assert_close(got.float(), sdpa.float(), rtol=2 ** -6, atol=2 ** -7)
    # float32 scores and sums, the softmax weights rounded to bf16 for the value sum as SDPA's
    # kernel rounds them: no further from float64 than SDPA is
    err, err_sdpa = (got.double() - want).abs(), (sdpa.double() - want).abs()
    assert err.max() <= 1.25 * err_sdpa.max() + 2 ** -12
    assert err.mean() <= 1.05 * err_sdpa.mean() + 2 ** -16


@needs_attn
def test_token_major_views_and_large_scores():
    # host rows are token-major [S, B, Hkv, D], attended through permuted views; peaked scores
    # (one key far above the rest) must not overflow the exponentials
    S, B, Hkv, D = 40, 3, 2, 64
    g = torch.Generator().manual_seed(1)
    tok_k = torch.randn(S, B, Hkv, D, generator=g).bfloat16()
    tok_v = torch.randn(S, B, Hkv, D, generator=g).bfloat16()
    tok_k[7] *= 40
    k, v = tok_k.permute(1, 2, 0, 3), tok_v.permute(1, 2, 0, 3)
    q = (torch.randn(B, 4, 1, D, generator=g) * 5).bfloat16()
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    got = mod.decode_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(got.float()).all()
    torch.testing.assert_close(got.double(), attention_reference(q, k, v, mask, 0.125), rtol=2 ** -7, atol=2 ** -9)


@needs_attn
def test_unsupported_layouts_fall_back_to_sdpa():
    assert not mod.supports(32, 2, 64)    # 16 query heads a group
    assert not mod.supports(8, 8, 80)     # head size not a multiple of 32 we build
    q = torch.randn(2, 32, 1, 64).bfloat16()
    k = v = torch.randn(2, 2, 10, 64).bfloat16()
    assert attn.decode_kernel(q, k, v) is None
    assert attn.decode_kernel(q.float(), k.float(), v.float()) is None
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    out = attn.attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, mask, 0.125), rtol=2 ** -6, atol=2 ** -7)


def teacher_forced_logits(llm, ids, tokens):
    """Prefill ``ids``, then decode ``tokens`` one by one; the logits of every decode step."""
    from tiergen.engine import prompt_positions
    from tiergen.sequence import Sequence
    eng = llm.engine
    mb, x = eng.new_micro_batch([Sequence(0, ids, len(tokens) + 1)], len(tokens) + 1)
    eng.forward([mb], [x], [prompt_positions(mb, x.shape[1])])
    return torch.stack([eng.decode_step([mb], [torch.tensor([t])])[0][0] for t in tokens])


@needs_attn
def test_engine_decodes_through_the_kernel_as_accurately_as_sdpa(hf_model_dirs, monkeypatch):
    hf, path = hf_model_dirs("llama_d64")
    ids = [1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64]
    tokens = [5, 77, 3, 140, 9, 200, 41, 18, 66, 2, 90, 250]
    with torch.no_grad():
        ref = hf(torch.tensor([ids + tokens])).logits[0, len(ids):].double()   # float32 transformers
    llm = LLM(path, dtype="bfloat16", batch_size=1)
    used = []
    real = attn.decode_kernel
    monkeypatch.setattr(attn, "decode_kernel", lambda *a: used.append(real(*a) is not None) or real(*a))
    ours = teacher_forced_logits(llm, ids, tokens).double()
    assert len(used) == len(tokens) * llm.config.num_layers and all(used)   # every decode attention
    monkeypatch.setattr(attn, "decode_kernel", lambda *a: None)
    sdpa = teacher_forced_logits(llm, ids, tokens).double()
    err, err_sdpa = (ours - ref).abs().max().item(), (sdpa - ref).abs().max().item()
    assert err <= 1.5 * err_sdpa + 1e-3, (err, err_sdpa)


def assert_placements_decode_alike(path, dtype, tmp_path):
    """Resident, host (token-major, attended through permuted views) and disk caches (read-back
    copies) generate the same tokens."""
    from tiergen import Policy
    prompts = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)

    def run(**kw):
        return [o.token_ids for o in LLM(path, dtype=dtype, **kw).generate(prompt_token_ids=prompts, params=params)]
    resident = run(batch_size=4)
    host = run(policy=Policy.from_percent([100, 0, 0, 100, 100, 0], gpu_batch_size=4))
    disk = run(policy=Policy.from_percent([100, 0, 0, 0, 100, 0], gpu_batch_size=4), offload_dir=str(tmp_path))
    assert resident == host == disk
    assert len({t for seq in resident for t in seq}) > 3


@needs_attn
def test_kernel_decodes_alike_from_every_cache_placement(hf_model_dirs, tmp_path):
    assert_placements_decode_alike(hf_model_dirs("llama_d64")[1], "bfloat16", tmp_path)


mod32 = kernels.load("decode_attention_f32")
needs_attn32 = pytest.mark.skipif(mod32 is None, reason="the float32 kernel cannot be built here (needs a C++ "
                                  "compiler, ninja and AVX2 with FMA)")


@needs_attn32
@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 64), (8, 1, 128), (14, 2, 64), (12, 4, 96), (6, 2, 80)])
@pytest.mark.parametrize("S", [1, 7, 8, 9, 70])
def test_float32_kernel_matches_reference(H, Hkv, D, S):
    q, k, v, mask = case(5, H, Hkv, D, S, S + 9, seed=S * 31 + H, dtype=torch.float32)
    assert mod32.supports(H, Hkv, D) and attn.decode_kernel(q, k, v) is mod32
    got = mod32.decode_attention(q, k, v, mask, D ** -0.5)
    assert got.shape == (5, H, 1, D) and got.dtype == torch.float32
    want = attention_reference(q, k, v, mask, D ** -0.5)
    # float32 throughout: as close to float64 as the batched-matmul form the torch path runs
    err = (got.double() - want).abs().max()
    err_torch = (attn.grouped_attention(q, k, v, mask).double() - want).abs().max()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@needs_attn32
def test_float32_kernel_on_token_major_views_large_scores_and_empty_rows():
    S, B, Hkv, D = 40, 3, 2, 64
    g = torch.Generator().manual_seed(1)
    tok_k, tok_v = torch.randn(S, B, Hkv, D, generator=g), torch.randn(S, B, Hkv, D, generator=g)
    tok_k[7] *= 40
    k, v = tok_k.permute(1, 2, 0, 3), tok_v.permute(1, 2, 0, 3)
    q = torch.randn(B, 4, 1, D, generator=g) * 5
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[2] = False                                       # a row that sees no key attends to nothing
    got = mod32.decode_attention(q, k, v, mask, 0.125)
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    torch.testing.assert_close(got[:2].double(), attention_reference(q, k, v, mask, 0.125)[:2], rtol=1e-5, atol=1e-5)
    assert not mod32.supports(32, 2, 64) and not mod32.supports(8, 8, 72)


@needs_attn32
def test_engine_decodes_through_the_float32_kernel_as_accurately_as_torch(hf_model_dirs, monkeypatch, tmp_path):
    hf, path = hf_model_dirs("llama_d64")
    ids = [1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64]
    tokens = [5, 77, 3, 140, 9, 200, 41, 18, 66, 2, 90, 250]
    with torch.no_grad():
        ref = hf(torch.tensor([ids + tokens])).logits[0, len(ids):].double()
    llm = LLM(path, dtype="float32", batch_size=1)
    used = []
    real = attn.decode_kernel
    monkeypatch.setattr(attn, "decode_kernel", lambda *a: used.append(real(*a) is mod32) or real(*a))
    ours = teacher_forced_logits(llm, ids, tokens).double()
    assert len(used) == len(tokens) * llm.config.num_layers and all(used)
    monkeypatch.undo()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert_placements_decode_alike(path, "float32", tmp_path)   # the cache's placements, through it


rows = kernels.load("rowwise")
needs_rows = pytest.mark.skipif(rows is None, reason="the row-wise kernels cannot be built here")


def torch_rms_norm(x, w, eps):
    # what tiergen.models.llama.rms_norm computes without the kernel (and the reference's roundings)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


@needs_rows
@pytest.mark.parametrize("E", [576, 64, 100, 4096])
def test_rms_norm_kernel_matches_torch(E):
    g = torch.Generator().manual_seed(E)
    x = (torch.randn(300, E + 8, generator=g) * 3).bfloat16()[:, 4:4 + E]    # strided rows
    w = (1 + 0.2 * torch.randn(E, generator=g)).bfloat16()
    got, want = rows.rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5)
    # the same roundings; only the order of each row's sum of squares differs
    assert (got == want).float().mean() > 0.999
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -6, atol=0)   # a bf16 ulp or two


@needs_rows
@pytest.mark.parametrize("H,D,rd", [(9, 64, 64), (3, 128, 128), (4, 64, 32), (2, 80, 80)])
def test_rope_kernel_is_bit_identical_to_torch(H, D, rd):
    from tiergen.models import rope
    g = torch.Generator().manual_seed(D + rd)
    x = torch.randn(50, H, D, generator=g).bfloat16()
    ang = torch.rand(50, 1, rd // 2, generator=g) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    got, want = torch.empty_like(x), torch.empty_like(x)
    rows.rope_into(x, cos, sin, got)
    fast = rope.kernels.for_bf16
    try:
        rope.kernels.for_bf16 = lambda *t: None           # the torch path
        rope.apply_rope_into(x, cos, sin, want)
    finally:
        rope.kernels.for_bf16 = fast
    assert torch.equal(got, want)
    assert torch.equal(got[..., rd:], x[..., rd:])


@needs_rows
@pytest.mark.parametrize("F_", [1536, 1, 17, 100])
def test_silu_mul_kernel_matches_torch_and_the_fallback(F_):
    from tiergen.models import base
    g = torch.Generator().manual_seed(F_)
    gu = (torch.randn(70, 2 * F_ + 6, generator=g) * 4).bfloat16()[:, 3:3 + 2 * F_]   # strided rows
    gu[0, :min(F_, 4)] = torch.tensor([0.0, -30.0, 60.0, -0.0])[:min(F_, 4)]             # saturated tails
    got = rows.silu_mul(gu)
    want = (F.silu(gu[:, :F_].float()) * gu[:, F_:].float()).bfloat16()   # float32, rounded once
    fast = base.kernels.for_bf16
    try:
        base.kernels.for_bf16 = lambda *t: None   # linear_gated's torch path, over an identity product
        fallback = base.linear_gated(gu.contiguous(), torch.eye(2 * F_).bfloat16(), None, "silu")
    finally:
        base.kernels.for_bf16 = fast
    assert torch.equal(fallback, want)
    assert got.shape == (70, F_) and got.dtype == torch.bfloat16
    # the same roundings; only e^-g's last float32 bits may differ from torch's and move a rounding
    assert (got == want).float().mean() > 0.999
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-30)


@needs_rows
@pytest.mark.parametrize("C", [1, 15, 16, 100, 8192])
def test_running_argmax_kernel_is_argmax_of_the_whole_row(C):
    g = torch.Generator().manual_seed(C)
    logits = (torch.randn(40, 3 * C, generator=g) * 4).bfloat16()
    logits[:5] = logits[:5].round()                  # many exact ties, within and across slices
    logits[5, :] = float("-inf")                     # nothing finite: id 0, as argmax says
    logits[6, C + 3 if 3 * C > C + 3 else 0] = 1e4   # a peak in a later slice
    best, arg = torch.empty(40), torch.empty(40, dtype=torch.long)
    for i, c0 in enumerate(range(0, 3 * C, C)):
        rows.argmax_update(logits[:, c0:c0 + C], best, arg, c0, i == 0)   # strided slices
    want = logits.float().argmax(-1)
    assert torch.equal(arg, want)
    assert torch.equal(best[6:], logits[6:].float().amax(-1))


def test_a_stale_build_lock_is_cleared_and_a_fresh_one_kept(tmp_path):
    import os
    import time
    lock = tmp_path / "lock"
    lock.write_text("")
    kernels._clear_stale_lock(tmp_path)
    assert lock.exists()                                  # a build may be running: wait for it
    old = time.time() - 3600
    os.utime(lock, (old, old))
    kernels._clear_stale_lock(tmp_path)
    assert not lock.exists()                              # left by a killed build: cleared
    kernels._clear_stale_lock(tmp_path)                   # and no lock at all is fine


def test_every_checkout_builds_from_the_same_staged_paths(tmp_path):
    """Sources are copied into the (content-named) build dir once: a second checkout of the
    same kernel names the same files, untouched, so ninja sees no change to rebuild for."""
    import shutil
    src = kernels.SOURCES["rowwise"]
    other = tmp_path / "other_checkout"
    other.mkdir()
    for f in (src, *src.parent.glob("*.h")):
        shutil.copy(f, other / f.name)
    where = tmp_path / "build"
    where.mkdir()
    first = kernels._staged(src, where)
    stamp = first.stat().st_mtime_ns
    assert kernels._staged(other / src.name, where) == first == where / src.name
    assert first.stat().st_mtime_ns == stamp and first.read_bytes() == src.read_bytes()
    assert {h.name for h in src.parent.glob("*.h")} <= {f.name for f in where.iterdir()}
    assert not list(where.glob(".*.tmp"))


def test_a_kernel_for_a_missing_cpu_feature_is_not_built(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernels, "cpu_flags", lambda: "flags\t\t: fpu avx512f avx512_bf16")
    for name in kernels.REQUIRES:
        assert kernels._build(name) is None
    assert not (tmp_path / "tiergen").exists()            # not even a build dir was made


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("TIERGEN_KERNELS", "0")
    assert kernels.load("decode_attention") is None and kernels.for_bf16("rowwise", torch.ones(2).bfloat16()) is None
    q = torch.randn(2, 9, 1, 64).bfloat16()
    k = torch.randn(2, 3, 5, 64).bfloat16()
    assert attn.decode_kernel(q, k, k) is None and attn.decode_kernel(q.float(), k.float(), k.float()) is None


def test_llm_builds_its_kernels_before_generating(monkeypatch):
    loaded = []
    monkeypatch.setattr(kernels, "load", lambda name: loaded.append(name))
    LLM("smollm2-135m", dtype="float32")
    assert loaded == ["decode_attention_f32"]
    loaded.clear()
    LLM("smollm2-135m", dtype="bfloat16")
    # the monkeypatched load builds nothing, so every head and product kernel is tried in its turn
    assert sorted(set(loaded)) == ["decode_attention", "linear", "linear_avx512", "lm_head", "lm_head_avx512",
                                   "prefill_attention", "rowwise"]
