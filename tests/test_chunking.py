"""Row-chunked layers and LM head (the CPU path) compute what unchunked ones do."""
import pytest

from tiergen import LLM, SamplingParams

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "mistral", "yarn_rope"])
def test_chunked_rows_match_whole(name, hf_model_dirs):
    _, path = hf_model_dirs(name)
    whole = LLM(path, dtype="float32", batch_size=4)
    chunked = LLM(path, dtype="float32", batch_size=4)
    whole.engine.chunk_rows = whole.engine.head_rows = None
    chunked.engine.chunk_rows, chunked.engine.head_rows = 7, 3   # ragged last chunks
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
    assert llm.engine.chunk_rows and llm.engine.head_rows
    assert llm.engine.chunk_rows * llm.config.ffn_dim * 4 <= 16 << 20
