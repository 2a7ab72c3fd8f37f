"""A KV cache stored narrower than the compute dtype (Policy.cache_dtype): transformers with
its cache rounded the same way gives the same logits, every placement gives the same
output, and the cache's bytes halve on every tier."""
import pytest
import torch
from transformers import DynamicCache

from checks import P, assert_same_output, resident_references
from test_parity import PROMPT, our_step_logits
from tiergen import LLM, Policy, SamplingParams
from tiergen.errors import InvalidRequestError
from tiergen.memory_plan import block_demand

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 41, 42, 43], [5, 6], list(range(10, 31)), [200, 100, 50, 25, 12]]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
BF16 = dict(cache_dtype="bfloat16")


class RoundedCache(DynamicCache):
    """transformers' cache, keeping keys and values rounded to bfloat16 (what tiergen stores)."""

    def update(self, key_states, value_states, layer_idx, *args, **kw):
        r = lambda t: t.to(torch.bfloat16).to(t.dtype)   # noqa: E731
        return super().update(r(key_states), r(value_states), layer_idx, *args, **kw)


def hf_rounded_logits(hf, ids: list[int], steps: int):
    """Prefill logits at every position, then greedy decode, with the rounded cache."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf(x, past_key_values=RoundedCache(config=hf.config), use_cache=True)
        prefill, cache = out.logits[0], out.past_key_values
        logits = [prefill[-1]]
        for _ in range(steps - 1):
            tok = logits[-1].argmax()
            out = hf(tok.view(1, 1), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return prefill, logits


@pytest.mark.parametrize("name", ["opt", "llama_gqa", "qwen2"])
def test_bf16_cache_matches_transformers_with_a_rounded_cache(name, hf_model_dirs, device):
    hf, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32", device=device, policy=Policy(**BF16))
    ours_prefill, ours = our_step_logits(llm, PROMPT, 12)
    ref_prefill, ref = hf_rounded_logits(hf, PROMPT, 12)
    assert (ours_prefill.cpu() - ref_prefill).abs().max() <= 1e-4
    # Decode steps read the rounded cache: a float32 difference of one ulp upstream can
    # flip one key's bfloat16 rounding (seen: 1.04e-4 on a Zen 4), so they get 5e-4,
    # still a small fraction of what the rounding itself moves (checked below).
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a.cpu() - b).abs().max() <= 5e-4, f"decode step {i}"
    # and the rounding is real: the float32 cache gives logits 0.02-0.05 away
    full_prefill, _ = our_step_logits(LLM(path, dtype="float32", device=device), PROMPT, 1)
    assert (ours_prefill - full_prefill).abs().max() > 1e-2


PLACEMENTS = {
    "cpu": P([100, 0, 0, 100, 100, 0], **BF16),
    "disk": P([100, 0, 0, 0, 100, 0], **BF16),
    "split": P([20, 40, 30, 30, 50, 50], **BF16),
    "cpu-attention": P([0, 100, 0, 50, 100, 0], cpu_attention=True, **BF16),
    "all-disk-row-no-overlap": P([0, 0, 0, 0, 100, 0], bs=1, k=3, schedule="row", overlap=False, **BF16),
    "compressed-split": P([100, 0, 30, 30, 100, 0], compress_cache=True, **BF16),
}


@pytest.fixture(scope="module")
def refs(hf_model_dirs):
    return resident_references(hf_model_dirs, PROMPTS, PARAMS)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_bf16_cache_gives_the_resident_output_on_every_placement(name, placement, refs, tmp_path, device):
    pol = PLACEMENTS[placement]
    path, ref_tokens, ref_scores = refs(name, **BF16, compress_cache=pol.compress_cache)
    llm = LLM(path, dtype="float32", policy=pol, offload_dir=str(tmp_path), device=device)
    assert_same_output(llm, PROMPTS, PARAMS, ref_tokens, ref_scores)
    llm.close()


def test_bf16_cache_halves_homes_and_disk_reads(hf_model_dirs, tmp_path):
    _, path = hf_model_dirs("llama_gqa")
    prompts = [list(range(3 + i, 43 + i)) for i in range(16)]   # big enough for many 4 KiB disk pages
    seen = {}
    for dt in ("float32", "bfloat16"):
        d = tmp_path / dt
        d.mkdir()
        llm = LLM(path, dtype="float32", policy=P([100, 0, 0, 50, 100, 0], bs=8, cache_dtype=dt),
                  offload_dir=str(d))
        llm.tiers.reset_peaks()
        llm.generate(prompt_token_ids=prompts, params=PARAMS)
        rep = llm.memory_report()
        seen[dt] = rep["kv_cache"], rep["links"]["disk->gpu"], rep["links"]["cpu->disk"]
        llm.close()
    (kv32, read32, wrote32), (kv16, read16, wrote16) = seen["float32"], seen["bfloat16"]
    assert kv16["cpu"] * 2 == kv32["cpu"] > 0
    assert abs(kv16["disk"] / kv32["disk"] - 0.5) < 0.1    # disk regions are 4 KiB aligned
    assert 0 < read16 and abs(read16 / read32 - 0.5) < 0.02
    assert 0 < wrote16 and abs(wrote16 / wrote32 - 0.5) < 0.02


def test_memory_plan_counts_the_cache_at_its_dtype(hf_model_dirs):
    from tiergen.config import ModelConfig
    cfg = ModelConfig.from_name("opt-1.3b")
    dev = torch.device("cpu")
    wide = block_demand(cfg, torch.float32, P([0, 30, 0, 50, 100, 0], bs=32, k=2), dev, 32, 2, 32, 32)
    narrow = block_demand(cfg, torch.float32, P([0, 30, 0, 50, 100, 0], bs=32, k=2, **BF16), dev, 32, 2, 32, 32)
    for tier in ("cpu", "disk"):
        assert abs(narrow[tier]["KV cache"] / wide[tier]["KV cache"] - 0.5) < 0.01
    # attention reads the narrow cache back at the compute dtype: that copy is compute scratch
    assert narrow["gpu"]["KV read back for attention"] > 0 == wide["gpu"]["KV read back for attention"]


def test_cost_model_moves_the_cache_at_its_dtype():
    from tiergen.config import ModelConfig
    from tiergen.policy.cost_model import CostModel, Workload
    from test_cost_model import cpu_profile
    slow_disk = cpu_profile(disk_read_Bps=0.1e9, disk_write_Bps=0.1e9)   # so the cache's bytes dominate
    cm = CostModel(ModelConfig.from_name("opt-1.3b"), torch.float32, slow_disk, Workload(32, 32))
    cache_on_disk = P([0, 30, 0, 0, 100, 0], bs=48, k=4)
    narrow = P([0, 30, 0, 0, 100, 0], bs=48, k=4, **BF16)
    assert cm.cache_ratio(cache_on_disk) == 1.0 and cm.cache_ratio(narrow) == 0.5
    kv_disk = block_demand(cm.cfg, torch.float32, cache_on_disk, cm.device, 48, 4, 32, 32)["disk"]["KV cache"]
    saved = cm.memory(cache_on_disk)["disk"] - cm.memory(narrow)["disk"]
    assert abs(saved / kv_disk - 0.5) < 0.01
    assert cm.predict(narrow).throughput > cm.predict(cache_on_disk).throughput


def test_bad_cache_dtype_is_refused():
    with pytest.raises(InvalidRequestError, match="cache_dtype"):
        Policy(cache_dtype="int8")


def test_cli_cache_dtype_flag(hf_model_dirs, capsys):
    from tiergen.cli import main
    _, path = hf_model_dirs("opt")
    assert main(["bench", "--model", path, "--prompt-len", "4", "--gen-len", "2", "--gpu-batch-size", "2",
                 "--dtype", "float32", "--cache-dtype", "bfloat16", "--json"]) == 0
    import json
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["policy"]["cache_dtype"] == "bfloat16"
    # k and v x 3 layers x 2 rows x 6 columns x 64 (heads x head_dim) x 2 bytes of bfloat16
    assert r["kv_cache_uncompressed"] == 2 * 3 * 2 * 6 * 64 * 2


def test_host_cast_scratch_is_reused(hf_model_dirs, tmp_path):
    """A bf16 cache is cast for attention into one buffer per field, not a new one per layer,
    micro-batch, step or block width."""
    _, path = hf_model_dirs("opt")
    llm = LLM(path, dtype="float32", policy=P([100, 0, 50, 50, 100, 0], **BF16), offload_dir=str(tmp_path))
    llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)
    bufs = dict(llm.runtime.cast_scratch.bufs)
    llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)
    assert bufs and llm.runtime.cast_scratch.bufs.keys() == bufs.keys()
    assert all(llm.runtime.cast_scratch.bufs[k] is b for k, b in bufs.items())
    assert all(b.dtype == torch.float32 for b in bufs.values())
    assert set(bufs) == {("k", torch.float32), ("v", torch.float32)}
    llm.generate(prompt_token_ids=[list(range(3, 40))] * 3, params=PARAMS)   # wider blocks
    assert llm.runtime.cast_scratch.bufs.keys() == bufs.keys()
