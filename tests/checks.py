"""Assertions shared by the placement and compression grids, and the kernels' attention reference."""
import torch

from tiergen import LLM, Policy, SamplingParams, kernels


def P(percent: list[float], bs: int = 2, k: int = 2, **kw) -> Policy:
    """A policy from FlexGen's six percents, in small blocks that make the grids spill."""
    return Policy.from_percent(percent, gpu_batch_size=bs, num_gpu_batches=k, **kw)


def reference(path: str, prompts: list[list[int]], params: SamplingParams, **llm_kw) -> tuple[list, list]:
    """Greedy tokens and scores of one run, to compare other placements against."""
    llm = LLM(path, dtype="float32", **llm_kw)
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)], \
        llm.score(token_ids=prompts)


def assert_same_output(llm: LLM, prompts: list[list[int]], params: SamplingParams,
                       ref_tokens: list[list[int]], ref_scores: list) -> dict:
    """Same greedy tokens and scores as the reference run, and every tier's peak within its
    budget; returns the memory report."""
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)] == ref_tokens
    for a, b in zip(llm.score(token_ids=prompts), ref_scores):
        assert abs(a.logprob - b.logprob) <= 1e-5 * abs(b.logprob)
    rep = llm.memory_report()
    for tier in rep["tiers"].values():
        assert tier["peak"] <= tier["budget"]
    return rep


def resident_references(hf_model_dirs, prompts: list[list[int]], params: SamplingParams):
    """``get(name, **policy_fields)`` -> (path, tokens, scores) of that model's fully resident
    run with those policy fields (compression, cache dtype), computed once per key."""
    cache: dict = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            _, path = hf_model_dirs(name)
            cache[key] = (path, *reference(path, prompts, params, policy=P([100, 0, 100, 0, 100, 0], **kw)))
        return cache[key]
    return get


def attention_reference(q, k, v, mask, scale):
    """float64 softmax attention, each query head on its group's K/V head."""
    G = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v


def built_kernel(name: str, needs: str):
    """Kernel module ``name``, or the test skipped where it cannot be built or used here."""
    import pytest
    mod = kernels.load(name)
    if mod is None:
        pytest.skip(f"{name} cannot be built or used here (needs a C++ compiler, ninja and {needs})")
    return mod
