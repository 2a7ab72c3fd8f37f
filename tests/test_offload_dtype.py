"""Offloaded weights kept at the checkpoint's narrower dtype: same output, half the bytes moved."""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checks import P, assert_same_output, reference

from tiergen import LLM, SamplingParams
from tiergen.errors import InvalidRequestError

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9], [5, 6], list(range(10, 31))]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


PLACEMENTS = {
    "w-cpu": P([0, 100, 100, 0, 100, 0]),
    "w-disk": P([0, 0, 100, 0, 100, 0]),
    "w-split-cpu-attn": P([20, 40, 30, 30, 50, 50], cpu_attention=True),
    "all-disk-row-1x3": P([0, 0, 0, 0, 100, 0], bs=1, k=3, schedule="row"),
}


@pytest.fixture(scope="module")
def bf16_dirs(hf_model_dirs, tmp_path_factory):
    """The test models re-saved as bfloat16 safetensors, with their references (fully resident, float32)."""
    root = tmp_path_factory.mktemp("bf16_models")
    cache = {}

    def get(name):
        if name not in cache:
            _, src = hf_model_dirs(name)
            dst = str(root / name)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
            tensors = load_file(os.path.join(src, "model.safetensors"))
            save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
                      metadata={"format": "pt"})
            cache[name] = (dst, *reference(dst, PROMPTS, PARAMS))
        return cache[name]
    return get


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_bf16_offloaded_weights_match_resident(name, placement, bf16_dirs, tmp_path, device):
    path, ref_tokens, ref_scores = bf16_dirs(name)
    llm = LLM(path, dtype="float32", policy=PLACEMENTS[placement], offload_dir=str(tmp_path), device=device)
    assert llm.store_dtype == torch.bfloat16
    assert_same_output(llm, PROMPTS, PARAMS, ref_tokens, ref_scores)
    llm.close()


def _dense_fp32_bytes(llm):
    return llm.weights.nbytes_by_tier(dense=True)


def test_disk_holds_and_streams_checkpoint_precision(bf16_dirs, tmp_path):
    path, ref_tokens, ref_scores = bf16_dirs("llama_gqa")
    steps = 5
    params = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    runs = {}
    for store in ("auto", "float32"):
        d = tmp_path / store
        d.mkdir()
        llm = LLM(path, dtype="float32", policy=P([0, 0, 100, 0, 100, 0]), offload_dir=str(d),
                  offload_dtype=store)
        on_disk = llm.weights.nbytes_by_tier()["disk"]
        llm.tiers.reset_peaks()
        outs = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS[:2], params=params)]
        runs[store] = (on_disk, llm.memory_report()["links"]["disk->gpu"], outs, _dense_fp32_bytes(llm)["disk"])
        llm.close()
    (bf_disk, bf_read, bf_out, dense), (f32_disk, f32_read, f32_out, _) = runs["auto"], runs["float32"]
    assert bf_out == f32_out == [t[:steps] for t in ref_tokens[:2]]
    assert f32_disk == dense                     # float32 storage: the dense size
    assert abs(bf_disk - dense / 2) <= 0.01 * dense    # bfloat16 storage: half of it
    # reads shrink with the stored bytes (4 KiB file alignment makes tiny layers' ratio inexact)
    assert 0 < bf_read and abs(bf_read / f32_read - 0.5) < 0.05


def test_compressed_blobs_use_the_offload_dtype(bf16_dirs, tmp_path):
    path, _, _ = bf16_dirs("opt")
    pol = dict(compress_weight=True)
    ref_tokens, ref_scores = reference(path, PROMPTS, PARAMS, policy=P([100, 0, 100, 0, 100, 0], **pol))
    f32 = LLM(path, dtype="float32", policy=P([0, 0, 100, 0, 100, 0], **pol), offload_dir=str(tmp_path / "a"),
              offload_dtype="float32")
    llm = LLM(path, dtype="float32", policy=P([0, 0, 100, 0, 100, 0], **pol), offload_dir=str(tmp_path / "b"))
    assert llm.weights.nbytes_by_tier()["disk"] < f32.weights.nbytes_by_tier()["disk"]
    assert_same_output(llm, PROMPTS, PARAMS, ref_tokens, ref_scores)
    llm.close()
    f32.close()


def test_memory_plan_counts_offloaded_bytes_at_their_dtype(bf16_dirs):
    from tiergen.memory_plan import weight_demand
    path, _, _ = bf16_dirs("opt")
    llm = LLM(path, dtype="float32")
    pol = P([0, 100, 100, 0, 100, 0])
    narrow = weight_demand(llm.model, torch.float32, pol, llm.device, torch.bfloat16)
    wide = weight_demand(llm.model, torch.float32, pol, llm.device)
    assert narrow["cpu"]["weights"] * 2 == wide["cpu"]["weights"]
    # the cast copies of a streamed group are compute scratch, at the compute dtype
    assert narrow["gpu"]["dequantized weights"] > 0 == wide["gpu"]["dequantized weights"]


def test_float32_checkpoint_is_not_narrowed(hf_model_dirs):
    _, path = hf_model_dirs("opt")
    assert LLM(path, dtype="float32").store_dtype == torch.float32
    assert LLM(path, dtype="bfloat16").store_dtype == torch.bfloat16


def test_bad_offload_dtype_is_refused(hf_model_dirs):
    _, path = hf_model_dirs("opt")
    with pytest.raises(InvalidRequestError, match="offload dtype"):
        LLM(path, offload_dtype="int3")


def test_cost_model_streams_offloaded_weights_at_their_dtype():
    from tiergen.config import ModelConfig
    from tiergen.policy.cost_model import CostModel, Workload
    from test_cost_model import cpu_profile
    cfg, wl = ModelConfig.from_name("opt-1.3b"), Workload(32, 8)
    wide = CostModel(cfg, torch.float32, cpu_profile(), wl)
    narrow = CostModel(cfg, torch.float32, cpu_profile(), wl, store=torch.bfloat16)
    disk_heavy = P([0, 10, 100, 0, 100, 0], bs=32, k=1)
    assert narrow.weight_ratio(disk_heavy) == 0.5 and wide.weight_ratio(disk_heavy) == 1.0
    assert narrow.memory(disk_heavy)["disk"] < 0.51 * wide.memory(disk_heavy)["disk"]
    assert narrow.predict(disk_heavy).throughput > wide.predict(disk_heavy).throughput


def test_host_casts_reuse_their_buffers(bf16_dirs, tmp_path):
    """Without a GPU the float32 copies of bf16-stored weights go into pooled buffers:
    one group's worth, reused by every layer and every pass instead of allocated anew."""
    path, ref_tokens, ref_scores = bf16_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", policy=PLACEMENTS["w-disk"], offload_dir=str(tmp_path))
    counts = []
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)] == ref_tokens
        counts.append(sum(len(v) for v in llm.weights.cast_pool.free_lists.values()))
    per_layer = sum(1 for h in llm.weights.homes[0].values() if h.dtype == torch.bfloat16)
    assert 0 < counts[0] == counts[1] <= per_layer + 1     # a layer's casts, or the head's
    llm.close()
