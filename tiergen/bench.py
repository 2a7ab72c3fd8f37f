"""`tiergen bench`: generation throughput of one policy, FlexGen's metric.

Prompts are random token ids (one block of gpu_batch_size x num_gpu_batches
by default); every sequence generates exactly gen_len tokens. A warm-up block
(same shape, 2 new tokens) runs first and is not timed. Generation throughput
= generated tokens / (prefill + decode wall time); prefill and decode rates are
reported separately. Nothing is projected.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from .errors import InvalidRequestError
from .llm import LLM
from .sampling import SamplingParams


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def run_bench(llm: LLM, prompt_len: int, gen_len: int, num_prompts: int | None = None,
              warmup: bool = True, progress: bool = False) -> dict[str, Any]:
    for what, v in (("prompt length", prompt_len), ("generation length", gen_len), ("number of prompts", num_prompts)):
        if v is not None and v < 1:
            raise InvalidRequestError(f"the {what} must be at least 1, got {v}")
    n = num_prompts or llm.policy.block_size
    prompts = random_prompts(n, prompt_len, llm.config.vocab_size)
    if warmup:
        llm.generate(prompt_token_ids=prompts[:llm.policy.block_size],
                     params=SamplingParams(max_new_tokens=min(2, gen_len), ignore_eos=True))
    llm.tiers.reset_peaks()
    stamps: list[float] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=gen_len * -(-n // llm.policy.block_size), desc="bench", unit="step", leave=False)

    def tick() -> None:
        stamps.append(time.perf_counter())
        if bar:
            bar.update(1)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, params=SamplingParams(max_new_tokens=gen_len, ignore_eos=True),
                        on_step=tick)
    t_end = time.perf_counter()
    if bar:
        bar.close()
    # With one block, the first tick marks the end of prefill; with several
    # blocks, prefill time is the sum over blocks of their first step.
    blocks = -(-n // llm.policy.block_size)
    per_block = len(stamps) // blocks if blocks else 0
    prefill_s, t_prev = 0.0, t0
    for b in range(blocks):
        first = stamps[b * per_block]
        prefill_s += first - t_prev
        t_prev = stamps[(b + 1) * per_block - 1]
    total_s = t_end - t0
    decode_s = max(total_s - prefill_s, 1e-9)
    gen_tokens = sum(len(o.token_ids) for o in outs)
    rep = llm.memory_report()
    return {
        "model": llm.config.name, "dtype": str(llm.dtype).replace("torch.", ""),
        "offload_dtype": str(llm.store_dtype).replace("torch.", ""), "device": str(llm.device),
        "policy": llm.policy.to_dict(), "prompt_len": prompt_len, "gen_len": gen_len, "num_prompts": n,
        "prefill_s": prefill_s, "decode_s": decode_s, "total_s": total_s, "gen_tokens": gen_tokens,
        "prefill_tok_s": n * prompt_len / prefill_s,
        "decode_tok_s": n * (gen_len - 1) / decode_s if gen_len > 1 else 0.0,
        "total_tok_s": gen_tokens / total_s,
        "peaks": {k: v["peak"] for k, v in rep["tiers"].items()},
        "budgets": {k: v["budget"] for k, v in rep["tiers"].items()},
        "links": rep["links"], "weights": rep["weights"],
        "weights_uncompressed": rep["weights_uncompressed"], "kv_cache": rep["kv_cache"],
        "kv_cache_uncompressed": rep["kv_cache_uncompressed"],
    }
