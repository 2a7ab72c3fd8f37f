"""Sampler: filtering never admits a token outside top-k / top-p; seeds reproduce."""
import pytest
import torch

from tiergen import LLM, SamplingParams
from tiergen.sampling import candidates, make_generators, sample


def allowed_set(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Reference: the top-k tokens, then the smallest prefix by probability reaching top_p."""
    order = torch.argsort(logits, descending=True).tolist()
    if top_k:
        order = order[:top_k]
    probs = torch.softmax(logits[order].double(), -1).tolist()
    keep, total = [], 0.0
    for tok, p in zip(order, probs):
        keep.append(tok)
        total += p
        if total >= top_p:
            break
    return set(keep)


def kept_sets(logits: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    """Each row's tokens that ``candidates`` leaves drawable (probability above zero)."""
    probs, ids = candidates(logits, top_k, top_p)
    if ids is None:
        ids = torch.arange(logits.shape[-1]).expand_as(probs)
    return [set(ids[r][probs[r] > 0].tolist()) for r in range(logits.shape[0])]


def test_filter_matches_reference_sets():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        logits = torch.randn(3, 40, generator=g) * 3
        top_k = [0, 1, 5, 17][trial % 4]
        top_p = [1.0, 0.9, 0.5, 0.1, 0.99][trial % 5]
        kept = kept_sets(logits, top_k, top_p)
        for r in range(3):
            assert kept[r] == allowed_set(logits[r] / 1.0, top_k, top_p), (trial, r)


def test_samples_stay_inside_top_k_and_top_p():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g) * 2
    for top_k, top_p in [(5, 1.0), (0, 0.6), (10, 0.8), (1, 1.0)]:
        params = SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p, seed=3)
        gens = make_generators(params, list(range(4)))
        scaled = logits / params.temperature
        allowed = [allowed_set(scaled[r], top_k, top_p) for r in range(4)]
        for _ in range(200):
            toks = sample(logits, params, gens).tolist()
            assert all(t in allowed[r] for r, t in enumerate(toks))


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))


def test_seeded_generation_is_reproducible_and_batch_invariant(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")
    prompts = [[1, 5, 9, 11], [1, 7], [3, 4, 5, 6, 7, 8]]
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    a = LLM(path, dtype="float32", batch_size=4)
    first = [o.token_ids for o in a.generate(prompt_token_ids=prompts, params=params)]
    again = [o.token_ids for o in a.generate(prompt_token_ids=prompts, params=params)]
    assert first == again
    b = LLM(path, dtype="float32", batch_size=1)
    assert [o.token_ids for o in b.generate(prompt_token_ids=prompts, params=params)] == first
    other = [o.token_ids for o in a.generate(prompt_token_ids=prompts,
                                               params=SamplingParams(**{**params.__dict__, "seed": 99}))]
    assert other != first
    greedy = [o.token_ids for o in a.generate(prompt_token_ids=prompts,
                                                params=SamplingParams(max_new_tokens=16, ignore_eos=True))]
    assert greedy != first, "sampling at temperature 1 should leave the greedy path"


def test_nucleus_wider_than_its_candidates_matches_the_reference():
    # flat rows over 3,000 ids: the nucleus outgrows the partial sort's candidates and the
    # row is sorted whole; a peaked row beside them stays within them
    from tiergen import sampling
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 3000, generator=g) * 0.1
    logits[1] *= 60
    assert sampling.NUCLEUS_CANDIDATES < 3000
    for top_k, top_p in [(0, 0.9), (2500, 0.8), (0, 0.3)]:
        kept = kept_sets(logits, top_k, top_p)
        for r in range(3):
            assert kept[r] == allowed_set(logits[r], top_k, top_p), (top_k, top_p, r)
    assert len(allowed_set(logits[0], 0, 0.9)) > sampling.NUCLEUS_CANDIDATES


def test_draws_follow_the_distribution():
    # one uniform per row from its own generator, placed in the row's cumulative distribution
    probs = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05])
    logits = probs.log()[None].repeat(4, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    gens = make_generators(params, list(range(4)))
    n = 5000
    counts = torch.zeros(5)
    for _ in range(n // 4):
        counts += torch.bincount(sample(logits, params, gens), minlength=5)
    freq = counts / counts.sum()
    assert counts[1] == 0                                         # probability zero: never drawn
    sigma = (probs * (1 - probs) / counts.sum()).sqrt()
    assert ((freq - probs).abs() <= 4 * sigma + 1e-9).all(), freq


# ------------------------------------------------------------ vLLM's conventions
def _greedy(llm, prompt, n=8, **kw):
    return llm.generate([prompt], SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))[0]


def test_stop_token_is_in_the_ids_not_the_text(smollm_path):
    llm = LLM(smollm_path)
    free = _greedy(llm, "The capital of France is")
    stop = free.token_ids[2]
    out = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=8, stop_token_ids=[stop]))[0]
    cut = free.token_ids.index(stop) + 1
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:cut]
    assert out.text == llm.tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
    assert out.text != llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_tiny_temperatures_are_greedy_and_top_k_minus_one_is_off(smollm_path):
    llm = LLM(smollm_path)
    greedy = _greedy(llm, "Once upon a time").token_ids
    for t in (1e-6, 1e-39, 1e-45):   # logits / t would overflow float32
        assert _greedy(llm, "Once upon a time", temperature=t, seed=1).token_ids == greedy
    assert SamplingParams(top_k=-1).top_k == 0
    assert (_greedy(llm, "Once upon a time", temperature=1.0, seed=3, top_k=-1).token_ids
            == _greedy(llm, "Once upon a time", temperature=1.0, seed=3).token_ids)


def test_one_params_object_for_all_prompts(smollm_path):
    from tiergen import InvalidRequestError
    llm = LLM(smollm_path)
    with pytest.raises(InvalidRequestError, match="one SamplingParams"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams()])


def test_generation_config_eos_ids_stop_too(hf_model_dirs, tmp_path):
    """Chat checkpoints keep their end-of-turn id in generation_config.json (Llama 3's 128009)."""
    import json
    import shutil
    _, path = hf_model_dirs("llama_gqa")
    prompt = [1, 17, 33, 99]
    free = LLM(path, dtype="float32").generate(prompt_token_ids=[prompt],
                                               params=SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    stop = next(t for t in free.token_ids[3:] if t not in free.token_ids[:3])
    d = tmp_path / "with_gen_config"
    shutil.copytree(path, d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, stop]}))
    llm = LLM(str(d), dtype="float32")
    assert stop in llm.config.eos_token_ids and 2 in llm.config.eos_token_ids
    out = llm.generate(prompt_token_ids=[prompt], params=SamplingParams(max_new_tokens=12))[0]
    cut = next(i for i, t in enumerate(free.token_ids) if t in (2, stop)) + 1
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:cut]


def test_max_tokens_min_tokens_and_their_checks():
    from tiergen import InvalidRequestError
    assert SamplingParams(max_tokens=5).max_new_tokens == 5 == SamplingParams(max_new_tokens=5).max_tokens
    assert SamplingParams(max_tokens=7, max_new_tokens=7).max_new_tokens == 7
    for kw in [dict(max_tokens=5, max_new_tokens=6), dict(min_tokens=9, max_tokens=8), dict(min_tokens=-1)]:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kw)


def test_min_tokens_masks_stop_ids_as_transformers_does(smollm_path, hf_smollm):
    """Until min_tokens are out, a stop id may not be drawn: transformers' min_new_tokens with
    the same ids as EOS is the reference (greedy, float32)."""
    llm = LLM(smollm_path, dtype="float32")
    ids = llm.encode("The capital of France is")
    free = llm.generate(prompt_token_ids=[ids], params=SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    stop = free.token_ids[1]
    for m in (0, 3, 8):
        out = llm.generate(prompt_token_ids=[ids], params=SamplingParams(
            max_new_tokens=8, min_tokens=m, stop_token_ids=[stop], ignore_eos=True))[0]
        ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=m, eos_token_id=[stop],
                                 do_sample=False, pad_token_id=stop)[0, len(ids):].tolist()
        ref = ref[:ref.index(stop) + 1] if stop in ref else ref
        assert out.token_ids == ref, m
        assert stop not in out.token_ids[:m] and len(out.token_ids) >= min(m + 1, 8) if m else out.token_ids == \
            free.token_ids[:2]


def test_min_tokens_defers_stop_strings_and_stop_text_can_be_kept(smollm_path):
    llm = LLM(smollm_path)
    free = _greedy(llm, "The capital of France is", n=12)
    stop = next(" " + w for w in free.text.split()[1:] if " " + w in free.text)
    at = free.text.index(stop)
    cut = _greedy(llm, "The capital of France is", n=12, stop=[stop])
    kept = _greedy(llm, "The capital of France is", n=12, stop=[stop], include_stop_str_in_output=True)
    assert cut.text == free.text[:at] and kept.text == free.text[:at + len(stop)]
    assert kept.token_ids == cut.token_ids and kept.finish_reason == "stop"
    # a stop string is not looked for before min_tokens: the first occurrence is passed over
    late = _greedy(llm, "The capital of France is", n=12, stop=[stop], min_tokens=len(cut.token_ids) + 1)
    assert len(late.token_ids) > len(cut.token_ids) and late.token_ids == free.token_ids[:len(late.token_ids)]
    assert late.finish_reason == ("stop" if stop in free.text[at + 1:] else "length")
    # a stop token's own text is kept too
    tok = llm.generate(["The capital of France is"], SamplingParams(
        max_new_tokens=8, stop_token_ids=[free.token_ids[2]], include_stop_str_in_output=True))[0]
    assert tok.text == llm.tokenizer.decode(free.token_ids[:3], skip_special_tokens=True)
