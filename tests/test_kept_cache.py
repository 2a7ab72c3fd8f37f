"""A closed cache's head-major buffers serve the next cache of the same shape: the same
tokens as fresh buffers, no allocation, and never more memory charged than without them."""
import pytest
import torch

from tiergen import LLM, SamplingParams, kv_cache

SHORT = [[1, 17, 33, 99, 12, 7, 8, 9], [5, 6, 7, 8, 9, 10, 11, 12], [3] * 8, list(range(40, 48))]
LONG = [[2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24], [5, 6], list(range(10, 22)), [3] * 9]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


def tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=PARAMS)]


@pytest.fixture
def fresh_buffers(monkeypatch):
    """Counts the head-major buffers allocated afresh."""
    made = []
    real = kv_cache._compute_empty

    def counted(shape, dtype, device):
        made.append(shape)
        return real(shape, dtype, device)
    monkeypatch.setattr(kv_cache, "_compute_empty", counted)
    return made


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_shape_reuses_buffers_and_tokens(dtype, hf_model_dirs, fresh_buffers, device):
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype=dtype, batch_size=4, device=device)
    layers = llm.config.num_layers
    base = llm.tiers.gpu.current
    first = tokens(llm, SHORT)
    assert len(fresh_buffers) == 2 * layers
    kept = sum(t.nbytes for _, _, t in llm.runtime.kept.bufs)
    assert len(llm.runtime.kept.bufs) == 2 * layers and llm.tiers.gpu.current == base + kept
    # Stale keys and values of the last call sit in the reused buffers; none may be read.
    with torch.inference_mode():
        for _, _, t in llm.runtime.kept.bufs:
            t.fill_(float("nan"))
    assert tokens(llm, SHORT) == first
    assert len(fresh_buffers) == 2 * layers       # nothing allocated the second time
    assert tokens(LLM(path, dtype=dtype, batch_size=4, device=device), SHORT) == first
    llm.close()
    assert llm.tiers.gpu.current == base and not llm.runtime.kept.bufs


def test_other_shape_drops_kept_buffers_first(hf_model_dirs, fresh_buffers):
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", batch_size=4)
    layers = llm.config.num_layers
    tokens(llm, SHORT)
    long_tokens = tokens(llm, LONG)
    assert len(fresh_buffers) == 4 * layers
    shapes = {k[0] for k, _, _ in llm.runtime.kept.bufs}
    assert len(llm.runtime.kept.bufs) == 2 * layers and shapes == {fresh_buffers[-1]}
    alone = LLM(path, dtype="float32", batch_size=4)
    assert tokens(alone, LONG) == long_tokens
    # the short call's buffers were let go before the long one charged its own
    assert llm.tiers.gpu.peak == alone.tiers.gpu.peak


def test_kept_buffers_of_many_micro_batches(hf_model_dirs, fresh_buffers):
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", batch_size=2, num_micro_batches=2)
    layers = llm.config.num_layers
    first = tokens(llm, SHORT)
    assert len(fresh_buffers) == 4 * layers      # two micro-batches, two buffers a layer each
    peak = llm.tiers.gpu.peak
    assert tokens(llm, SHORT) == first and len(fresh_buffers) == 4 * layers
    assert llm.tiers.gpu.peak == peak


def test_kept_buffers_never_refuse_a_call_that_fits_without_them(hf_model_dirs):
    from tiergen.memory_plan import block_demand
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", batch_size=4)
    base = llm.tiers.gpu.current
    tokens(llm, LONG)
    assert llm.runtime.kept.bufs
    width, new = max(map(len, SHORT)), PARAMS.max_new_tokens
    need = sum(block_demand(llm.config, llm.dtype, llm.policy, llm.device, 4, 1, width, new)["gpu"].values())
    llm.tiers.gpu.budget = base + need     # the short call fits exactly, but not beside the kept buffers
    assert llm.tiers.gpu.current > base
    # every charge checks the budget, so the call passing is the check
    assert tokens(llm, SHORT) == tokens(LLM(path, dtype="float32", batch_size=4), SHORT)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_keys_and_values_written_in_place_match_stored_copies(dtype, hf_model_dirs, monkeypatch):
    """A decode step's keys and values land in the dense cache's own column (new_rows);
    written into fresh tensors and copied in by attend instead, every score is the same."""
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype=dtype, batch_size=4)
    real, handed = kv_cache.LayerCache.new_rows, []

    def spy(self, start, num_new):
        rows = real(self, start, num_new)
        handed.append(rows is not None)
        return rows
    monkeypatch.setattr(kv_cache.LayerCache, "new_rows", spy)
    in_place = tokens(llm, LONG)
    layers = llm.config.num_layers
    # the prefill's 12 columns are copied; every decode step's column is written in place
    assert handed[:layers] == [False] * layers and all(handed[layers:]) and len(handed) > layers
    sampled = SamplingParams(max_new_tokens=10, ignore_eos=True, temperature=1.5, seed=3)   # flat: any change shows
    drawn = [o.token_ids for o in llm.generate(prompt_token_ids=LONG, params=sampled)]
    monkeypatch.setattr(kv_cache.LayerCache, "new_rows", lambda self, start, num_new: None)
    assert tokens(llm, LONG) == in_place
    assert [o.token_ids for o in llm.generate(prompt_token_ids=LONG, params=sampled)] == drawn
