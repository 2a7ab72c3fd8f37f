"""Assertions shared by the placement and compression grids."""
from tiergen import LLM, SamplingParams


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
