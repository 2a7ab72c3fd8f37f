"""Compressed weights and KV cache in the engine: parity with transformers running the
dequantized weights, identical output on every placement, bytes really shrink."""
import copy
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from checks import P, assert_same_output, resident_references
from test_parity import PROMPT, hf_step_logits, our_step_logits
from tiergen import LLM, Policy, SamplingParams
from tiergen.kv_codec import DenseCodec, QuantCodec, empty_store, nbytes
from tiergen.quant import WEIGHT_QUANT, KVQuantConfig, dequantize, quantize
from tiergen.weights.tiered import compressed

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 41, 42, 43], [5, 6], list(range(10, 31)), [200, 100, 50, 25, 12]]
PARAMS = SamplingParams(max_new_tokens=14, ignore_eos=True)
RESIDENT = dict(w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100, cache_cpu_percent=0,
                act_gpu_percent=100, act_cpu_percent=0)


def dequantized_copy(hf, llm):
    """transformers model whose compressible weights are replaced by dequantize(quantize(w))."""
    ref = copy.deepcopy(hf)
    shapes = llm.model.checkpoint_shapes()
    n = 0
    with torch.no_grad():
        for name, p in ref.named_parameters():
            slot = llm.model.slot(name)
            if slot is None:
                continue
            g, key = slot
            if key in shapes.get(g, {}) and compressed(g, key, tuple(p.shape), llm.weights.tied):
                p.copy_(dequantize(quantize(p.detach(), WEIGHT_QUANT)))
                n += 1
    assert n > 0
    return ref


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "llama_tied", "qwen2", "mistral"])
def test_compressed_weights_match_transformers_on_dequantized_weights(name, hf_model_dirs, device):
    hf, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32", device=device, policy=Policy(compress_weight=True))
    ref = dequantized_copy(hf, llm)
    ours_prefill, ours = our_step_logits(llm, PROMPT, 12)
    ref_prefill, ref_steps, ref_tokens = hf_step_logits(ref, PROMPT, 12)
    assert (ours_prefill.cpu() - ref_prefill).abs().max() <= 1e-4
    for i, (a, b) in enumerate(zip(ours, ref_steps)):
        assert (a.cpu() - b).abs().max() <= 1e-4, f"decode step {i}"
    out = llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert out[0].token_ids == ref_tokens
    # and compression really happened: the dense model's logits differ
    dense_prefill, _, _ = hf_step_logits(hf, PROMPT, 1)
    assert (ours_prefill.cpu() - dense_prefill).abs().max() > 1e-3


WEIGHT_GRID = {
    "w-cpu": P([0, 100, 100, 0, 100, 0]),
    "w-disk": P([0, 0, 100, 0, 100, 0]),
    "w-split": P([30, 30, 100, 0, 100, 0]),
    "w-disk-row-no-overlap": P([0, 0, 100, 0, 100, 0], schedule="row", overlap=False),
    "all-split": P([20, 40, 30, 30, 50, 50], cpu_attention=True),
}


@pytest.fixture(scope="module")
def compressed_resident(hf_model_dirs):
    return resident_references(hf_model_dirs, PROMPTS, PARAMS)


@pytest.mark.parametrize("policy", list(WEIGHT_GRID))
@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_compressed_weights_same_output_on_every_placement(name, policy, compressed_resident, tmp_path, device):
    path, ref_tokens, ref_scores = compressed_resident(name, compress_weight=True)
    llm = LLM(path, dtype="float32", policy=replace(WEIGHT_GRID[policy], compress_weight=True),
              offload_dir=str(tmp_path), device=device)
    assert_same_output(llm, PROMPTS, PARAMS, ref_tokens, ref_scores)
    llm.close()
    assert not os.listdir(tmp_path)


CACHE_GRID = {
    "cache-gpu": P([100, 0, 100, 0, 100, 0]),
    "cache-cpu": P([100, 0, 0, 100, 100, 0]),
    "cache-disk": P([100, 0, 0, 0, 100, 0]),
    "cache-split": P([100, 0, 34, 33, 100, 0], bs=3, k=2),
    "cpu-attn-cache-cpu": P([100, 0, 0, 100, 100, 0], cpu_attention=True),
    "cpu-attn-cache-disk": P([100, 0, 0, 0, 100, 0], cpu_attention=True),
    "all-disk-row": P([0, 0, 0, 0, 100, 0], schedule="row"),
    "all-split-no-overlap": P([20, 40, 30, 30, 50, 50], overlap=False),
    "block-1x4": P([0, 0, 0, 0, 100, 0], bs=1, k=4),
}


@pytest.mark.parametrize("policy", list(CACHE_GRID))
@pytest.mark.parametrize("keys", ["channel", "token"])
@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_compressed_cache_same_output_on_every_placement(name, keys, policy, compressed_resident, tmp_path, device):
    # groups of 8 tokens: blocks fill and spill over within these short prompts
    q = KVQuantConfig(bits=4, group_size=8, per_channel_keys=keys == "channel")
    path, ref_tokens, ref_scores = compressed_resident(name, compress_cache=True, cache_quant=q)
    base = replace(CACHE_GRID[policy], compress_cache=True, cache_quant=q)
    # the block shape decides which rows share a micro-batch (and its padding): compare like with like
    if (base.gpu_batch_size, base.num_gpu_batches) != (2, 2):
        ref = LLM(path, dtype="float32", policy=replace(base, **RESIDENT))
        ref_tokens = [o.token_ids for o in ref.generate(prompt_token_ids=PROMPTS, params=PARAMS)]
        ref_scores = ref.score(token_ids=PROMPTS)
    llm = LLM(path, dtype="float32", policy=base, offload_dir=str(tmp_path), device=device)
    rep = assert_same_output(llm, PROMPTS, PARAMS, ref_tokens, ref_scores)
    if not rep["kv_cache"]["disk"]:   # (tiny disk fields round up to 4 KiB each)
        assert sum(rep["kv_cache"].values()) < rep["kv_cache_uncompressed"]
    llm.close()
    assert not os.listdir(tmp_path)


def test_cache_compression_error_shrinks_with_bits(hf_model_dirs):
    """8-bit cache logits sit close to the dense cache's; 4-bit further off; neither is a no-op."""
    _, path = hf_model_dirs("llama_gqa")
    ids = list(range(3, 40))

    def lp(**kw):
        llm = LLM(path, dtype="float32", policy=Policy(**kw))
        return torch.cat(llm.token_logprobs([ids]))
    dense = lp()
    err8 = (lp(compress_cache=True, cache_quant=KVQuantConfig(bits=8, group_size=8)) - dense).abs().max()
    err4 = (lp(compress_cache=True, cache_quant=KVQuantConfig(bits=4, group_size=8)) - dense).abs().max()
    assert 0 < err8 < err4 / 4


@pytest.mark.parametrize("per_channel", [True, False])
def test_codec_is_independent_of_how_tokens_arrive(per_channel):
    """Prefill-then-decode writes read back exactly as one big write (blocks quantize the same tokens)."""
    torch.manual_seed(0)
    cfg = KVQuantConfig(bits=4, group_size=8, per_channel_keys=per_channel)
    k, v = torch.randn(2, 37, 3, 2, 16).unbind(0)
    a, b = QuantCodec(cfg, 3, 2, 16, 40, torch.float32), QuantCodec(cfg, 3, 2, 16, 40, torch.float32)
    sa, sb = empty_store(a), empty_store(b)
    a.write(sa, 0, k, v)
    b.write(sb, 0, k[:13], v[:13])
    for t in range(13, 37):
        b.write(sb, t, k[t:t + 1], v[t:t + 1])
    for end in (5, 8, 16, 37):
        ka, va = a.read(sa, end)
        kb, vb = b.read(sb, end)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
        # within half a quantization step of each group (values: per token over head_dim)
        vq = quantize(v[:end], cfg.value(-1))
        step = vq.scales.float().repeat_interleave(cfg.group_size, -1)[..., :16]
        assert ((va - v[:end]).abs() <= step / 2 + 1e-6).all()
    assert nbytes(a) < nbytes(DenseCodec(3, 2, 16, 40, torch.float32))


def test_weights_are_dequantized_once_per_block(hf_model_dirs, tmp_path, monkeypatch):
    import tiergen.weights.tiered as tiered
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", policy=P([0, 0, 100, 0, 100, 0], bs=2, k=2, compress_weight=True),
              offload_dir=str(tmp_path))
    per_pass = sum(1 for homes in llm.weights.homes.values() for h in homes.values() if h.quant is not None)
    calls = []
    for name in ("dequantize", "dequantize_into"):   # the GPU's path and the host's
        real = getattr(tiered, name)
        monkeypatch.setattr(tiered, name, lambda *a, real=real, **kw: calls.append(1) or real(*a, **kw))
    steps = 5
    llm.generate(prompt_token_ids=PROMPTS, params=SamplingParams(max_new_tokens=steps, ignore_eos=True))
    assert len(calls) == per_pass * steps    # two micro-batches, yet one dequantize per weight per pass


def test_disk_reads_shrink_with_compressed_weights(hf_model_dirs, tmp_path):
    _, path = hf_model_dirs("llama_gqa")
    read = {}
    for compress in (False, True):
        llm = LLM(path, dtype="bfloat16", policy=P([0, 0, 100, 0, 100, 0], compress_weight=compress),
                  offload_dir=str(tmp_path))
        llm.tiers.reset_peaks()
        llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)
        read[compress] = llm.memory_report()["links"]["disk->gpu"]
        w = llm.memory_report()
        if compress:
            # 4-bit codes + a bf16 min and scale per 32 values: 5 bits of every 16 for the matrices
            assert w["weights"]["disk"] < 0.6 * w["weights_uncompressed"]["disk"]
        llm.close()
    assert read[True] < 0.6 * read[False]


def test_cli_compression_flags(hf_model_dirs, tmp_path):
    _, path = hf_model_dirs("opt")
    cmd = [sys.executable, "-m", "tiergen.cli", "bench", "--model", path, "--dtype", "float32",
           "--prompt-len", "8", "--gen-len", "3", "--gpu-batch-size", "2", "--percent", "0", "0", "0", "0", "100", "0",
           "--offload-dir", str(tmp_path), "--compress-weight", "--compress-cache", "--quant-bits", "8",
           "--group-size", "16", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["policy"]["compress_weight"] and out["policy"]["compress_cache"]
    assert out["policy"]["weight_quant"]["bits"] == 8 and out["policy"]["cache_quant"]["group_size"] == 16
    assert out["weights"]["disk"] < out["weights_uncompressed"]["disk"]
    bad = subprocess.run(cmd[:-1] + ["--quant-bits", "9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "bits" in bad.stderr
