"""The embedded SmolLM2 GGUF: same greedy tokens as transformers loading the same file."""
import pytest
import torch

from tiergen import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "Water boils at a temperature of"]
CHATS = ["What is the capital of Japan?", "Write one sentence about the sea."]
STEPS = 24


@pytest.fixture(scope="module")
def ours():
    return LLM("smollm2-135m", dtype="float32")


@pytest.fixture(scope="module")
def reference(hf_smollm):
    return hf_smollm


def hf_greedy(hf, ids, steps):
    with torch.no_grad():
        # An explicit mask: pad id 2 is also <|im_end|>, which chat prompts contain.
        x = torch.tensor([ids])
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False,
                          eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("chat", [False, True])
def test_greedy_tokens_match_transformers_gguf(ours, reference, chat):
    prompts = CHATS if chat else PROMPTS
    ids = [ours.encode(p, chat=chat) for p in prompts]
    got = ours.generate(prompts, SamplingParams(max_new_tokens=STEPS, ignore_eos=True), chat=chat)
    for p, o in zip(ids, got):
        assert o.prompt_token_ids == p
        assert o.token_ids == hf_greedy(reference, p, STEPS)


def test_default_model_answers_sensibly():
    llm = LLM("smollm2-135m")
    # the CPU default is the faster dtype there (tiergen/cpu_dtype.py), bf16 on a GPU
    from tiergen.cpu_dtype import faster_cpu_dtype
    assert llm.dtype == (faster_cpu_dtype() if llm.device.type == "cpu" else torch.bfloat16)
    out = llm.generate(["What is the capital of France?"], SamplingParams(max_new_tokens=24), chat=True)[0]
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_stop_strings_cut_text(ours):
    free = ours.generate(PROMPTS[2], SamplingParams(max_new_tokens=32, ignore_eos=True))[0]
    words = free.text.split()
    assert len(words) > 4
    stop = " " + words[3]
    cut = ours.generate(PROMPTS[2], SamplingParams(max_new_tokens=32, stop=[stop], ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and free.text.startswith(cut.text)
    assert len(cut.token_ids) < len(free.token_ids)


def test_score_and_perplexity(ours):
    text = "The quick brown fox jumps over the lazy dog. " * 4
    s = ours.score([text])[0]
    ids = ours.encode(text)
    assert s.num_tokens == len(ids) - 1 and s.logprob < 0
    full = ours.perplexity(text, window=len(ids))
    assert full.num_tokens == len(ids) - 1
    assert abs(full.nll + s.logprob) <= 1e-3 * abs(s.logprob)
    # a sliding window scores every token once, with less context: never better than full context here
    slid = ours.perplexity(text, window=12, stride=5)
    assert slid.num_tokens == len(ids) - 1
    assert slid.ppl > full.ppl
