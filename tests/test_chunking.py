"""Row-chunked layers and the vocabulary-sliced greedy head (the CPU path) compute what unchunked ones do."""
import pytest
import torch

from tiergen import LLM, SamplingParams
from tiergen.models.base import greedy_head

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "mistral", "yarn_rope"])
def test_chunked_rows_match_whole(name, hf_model_dirs):
    _, path = hf_model_dirs(name)
    whole = LLM(path, dtype="float32", batch_size=4)
    chunked = LLM(path, dtype="float32", batch_size=4)
    whole.engine.chunk_rows = whole.engine.head_slice_rows = None
    chunked.engine.chunk_rows, chunked.engine.head_slice_rows = 7, 256   # ragged last chunks and slices
    a = whole.score(token_ids=PROMPTS)
    b = chunked.score(token_ids=PROMPTS)
    for x, y in zip(a, b):
        assert abs(x.logprob - y.logprob) <= 1e-5 * abs(x.logprob)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    ga = whole.generate(prompt_token_ids=PROMPTS, params=params)
    gb = chunked.generate(prompt_token_ids=PROMPTS, params=params)
    assert [o.token_ids for o in ga] == [o.token_ids for o in gb]


def test_cpu_engine_chunks_by_default():
    llm = LLM("smollm2-135m", dtype="float32")
    assert llm.engine.chunk_rows and llm.engine.head_slice_rows
    assert llm.engine.chunk_rows * llm.config.ffn_dim * 4 <= 16 << 20


class _Plain:
    def head_features(self, w, x):
        return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_greedy_head_is_argmax_of_full_logits(dtype):
    g = torch.Generator().manual_seed(0)
    w = {"lm_head": torch.randn(1000, 32, generator=g).to(dtype)}   # 4 slices, the last ragged
    w["lm_head"][700] = w["lm_head"][90]      # exact ties across slices: the lower id must win
    w["lm_head"][999] = w["lm_head"][998]     # and within one
    x = torch.randn(64, 32, generator=g).to(dtype)
    x[:8] = w["lm_head"][90]                  # rows whose best is the tied pair
    x[8:16] = w["lm_head"][998]
    full = torch.nn.functional.linear(x, w["lm_head"]).float().argmax(-1)
    sliced = greedy_head(_Plain(), w, x, slice_rows=256)
    assert torch.equal(sliced, full)
    assert (sliced[:8] == 90).all() and (sliced[8:16] == 998).all()


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "qwen2"])
def test_prompt_last_layer_works_on_last_positions_only(name, hf_model_dirs, monkeypatch):
    """A prompt's last layer does the work after attention for each sequence's last position
    only (the rest feeds nothing), and the tokens are those of the full pass."""
    _, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32", batch_size=2)      # two micro-batches
    eng = llm.engine
    seen = []
    layer = eng.model.layer

    def spy(w, x, ctx, kv):
        out = layer(w, x, ctx, kv)
        seen.append((ctx.last_only, x.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(eng.model, "layer", spy)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=params)]
    prompt = [s for s in seen if s[1] > 1]
    assert prompt
    assert [out for last, _, out in prompt if last] == [1] * (len(prompt) // llm.config.num_layers)
    assert all(out == t for last, t, out in prompt if not last)
    assert not any(last for last, t, _ in seen if t == 1)       # decode steps: every layer whole
    full = eng.forward
    monkeypatch.setattr(eng, "forward", lambda mbs, ids, pos, last_only=False: full(mbs, ids, pos))
    assert [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, params=params)] == got
