"""Parity with Hugging Face transformers on small random models of every family."""
import pytest
import torch

from hf_models import CONFIGS
from tiergen import LLM, SamplingParams
from tiergen.engine import prompt_positions
from tiergen.sequence import Sequence

STEPS = 24
PROMPT = [1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64]   # 12 tokens: longer than mistral's window of 8


def our_step_logits(llm: LLM, ids: list[int], steps: int):
    """Prefill logits at every position, then greedy decode; returns (prefill [T,V], [step logits])."""
    eng = llm.engine
    mb, x = eng.new_micro_batch([Sequence(0, ids, steps)], steps)
    hidden = eng.forward([mb], [x], [prompt_positions(mb, x.shape[1])])
    prefill = eng.logits(hidden[0])[0]
    out = [prefill[-1]]
    for _ in range(steps - 1):
        tok = out[-1].argmax()[None]
        out.append(eng.decode_step([mb], [tok])[0][0])
    return prefill, out


def hf_step_logits(hf, ids: list[int], steps: int):
    x = torch.tensor([ids])
    with torch.no_grad():
        prefill = hf(x).logits[0]
        g = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, do_sample=False, output_logits=True,
                        return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return prefill, [lg[0] for lg in g.logits], g.sequences[0, len(ids):].tolist()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(name, hf_model_dirs, device):
    hf, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32", device=device)
    ours_prefill, ours = our_step_logits(llm, PROMPT, STEPS)
    ref_prefill, ref, ref_tokens = hf_step_logits(hf, PROMPT, STEPS)
    assert (ours_prefill.cpu() - ref_prefill).abs().max() <= 1e-4
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a.cpu() - b).abs().max() <= 1e-4, f"decode step {i}"
    out = llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=STEPS, ignore_eos=True))
    assert out[0].token_ids == ref_tokens
    assert len(set(ref_tokens)) > 2, "degenerate reference: the test would prove little"


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "qwen2", "mistral", "yarn_rope"])
def test_score_matches_transformers(name, hf_model_dirs):
    hf, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32")
    texts = [PROMPT, PROMPT[:5] + [44, 45, 46], list(range(3, 40))]
    got = llm.score(token_ids=texts)
    for ids, s in zip(texts, got):
        with torch.no_grad():
            lp = hf(torch.tensor([ids])).logits[0, :-1].double().log_softmax(-1)
        ref = lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        assert s.num_tokens == len(ids) - 1
        assert abs(s.logprob - ref) <= 1e-4 * abs(ref)


@pytest.mark.parametrize("name", ["opt", "opt350m", "llama_gqa", "mistral"])
def test_batched_mixed_lengths_equal_one_by_one(name, hf_model_dirs):
    _, path = hf_model_dirs(name)
    prompts = [PROMPT, [5, 6], list(range(10, 31)), [200, 100, 50, 25, 12], [3] * 9]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    batched = LLM(path, dtype="float32", batch_size=4, num_micro_batches=2)
    single = LLM(path, dtype="float32", batch_size=1)
    together = batched.generate(prompt_token_ids=prompts, params=params)
    for p, o in zip(prompts, together):
        alone = single.generate(prompt_token_ids=[p], params=params)[0]
        assert o.token_ids == alone.token_ids
        assert o.prompt_token_ids == p


def test_row_schedule_matches_zigzag(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")
    prompts = [PROMPT, [5, 6, 7], list(range(10, 31))]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    a = LLM(path, dtype="float32", batch_size=1, num_micro_batches=3, schedule="zigzag")
    b = LLM(path, dtype="float32", batch_size=1, num_micro_batches=3, schedule="row")
    assert [o.token_ids for o in a.generate(prompt_token_ids=prompts, params=params)] == \
           [o.token_ids for o in b.generate(prompt_token_ids=prompts, params=params)]


def test_stop_token_finishes_each_sequence_on_its_own(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", batch_size=8)
    prompts = [PROMPT, [5, 6], list(range(10, 31))]
    free = llm.generate(prompt_token_ids=prompts, params=SamplingParams(max_new_tokens=16, ignore_eos=True))
    # stop on the 4th token the first prompt generates; the others must be unaffected unless they hit it
    stop_tok = free[0].token_ids[3]
    got = llm.generate(prompt_token_ids=prompts,
                       params=SamplingParams(max_new_tokens=16, stop_token_ids=[stop_tok], ignore_eos=True))
    for f, g in zip(free, got):
        if stop_tok in f.token_ids:
            cut = f.token_ids.index(stop_tok) + 1
            assert g.token_ids == f.token_ids[:cut] and g.finish_reason == "stop"
        else:
            assert g.token_ids == f.token_ids and g.finish_reason == "length"
    assert got[0].finish_reason == "stop" and len(got[0].token_ids) <= 4


def test_eos_stops_unless_ignored(hf_model_dirs):
    _, path = hf_model_dirs("opt")
    llm = LLM(path, dtype="float32")
    free = llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    eos_at = free.token_ids[2]
    import dataclasses
    llm.config = dataclasses.replace(llm.config, eos_token_ids=(eos_at,))
    got = llm.generate(prompt_token_ids=[PROMPT], params=SamplingParams(max_new_tokens=16))[0]
    assert got.finish_reason == "stop" and got.token_ids[-1] == eos_at
    assert got.token_ids == free.token_ids[:free.token_ids.index(eos_at) + 1]
