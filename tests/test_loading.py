"""Checkpoint loading: sharded safetensors, the local Hub cache, dtype conversion, streaming."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiergen import LLM, SamplingParams

PROMPT = [1, 17, 33, 99, 12, 7]


def greedy(llm, n=10):
    return llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids


def test_sharded_safetensors_equal_single_file(hf_model_dirs, tmp_path):
    _, path = hf_model_dirs("llama_gqa")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    names = sorted(tensors)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    shutil.copy(os.path.join(path, "config.json"), shard_dir)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(shard_dir / fname))
        weight_map.update({n: fname for n in part})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert greedy(LLM(str(shard_dir), dtype="float32")) == greedy(LLM(path, dtype="float32"))


@pytest.mark.parametrize("name,key", [("mlp.up_proj", "w_up"), ("self_attn.k_proj", "wk")])   # wk: one of w_qkv's parts
def test_missing_tensor_is_named(hf_model_dirs, tmp_path, name, key):
    from tiergen import CheckpointError
    _, path = hf_model_dirs("llama_gqa")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors[f"model.layers.1.{name}.weight"]
    d = tmp_path / "holey"
    d.mkdir()
    shutil.copy(os.path.join(path, "config.json"), d)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"missing weight '{key}' of layer 1"):
        LLM(str(d))


@pytest.mark.parametrize("extra,like", [("model.layers.0.self_attn.o_proj.bias", "model.norm.weight"),
                                        ("model.layers.3.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight")])
def test_weight_the_config_does_not_describe_is_refused(hf_model_dirs, tmp_path, extra, like):
    """A bias or a layer the config lacks means config and checkpoint disagree: loading
    without it would run another model, so it is an error rather than skipped."""
    from tiergen import CheckpointError
    _, path = hf_model_dirs("llama_gqa")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    tensors[extra] = torch.zeros_like(tensors[like])
    d = tmp_path / "extra"
    d.mkdir()
    shutil.copy(os.path.join(path, "config.json"), d)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is not in the model its config describes"):
        LLM(str(d))


def test_hub_id_from_local_cache(hf_model_dirs, tmp_path, monkeypatch):
    _, path = hf_model_dirs("opt")
    snap = tmp_path / "models--acme--tiny-opt" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in os.listdir(path):
        shutil.copy(os.path.join(path, f), snap)
    (tmp_path / "models--acme--tiny-opt" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-opt" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    assert greedy(LLM("acme/tiny-opt", dtype="float32")) == greedy(LLM(path, dtype="float32"))


def test_bf16_close_to_fp32(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")
    a, b = LLM(path, dtype="float32"), LLM(path, dtype="bfloat16")
    assert b.weights.group(0)["w_qkv"].dtype == torch.bfloat16
    sa, sb = a.score(token_ids=[list(range(1, 60))])[0], b.score(token_ids=[list(range(1, 60))])[0]
    assert abs(sa.logprob - sb.logprob) <= 0.03 * abs(sa.logprob)


def test_gguf_load_keeps_peak_memory_near_model_size(smollm_path):
    """Streaming: loading must not hold the model twice (measured as peak RSS growth)."""
    import subprocess
    import sys
    code = ("import resource, torch; from tiergen import LLM; "
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; llm = LLM('smollm2-135m', dtype='float32'); "
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "print(base * 1024, peak * 1024, sum(llm.weights.nbytes_by_tier().values()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak, size = map(int, out)
    # the mmapped file (98 MB) is also touched; twice the fp32 model would be +1.08 GB
    assert peak - base < 1.35 * size + 150e6, (peak - base, size)
