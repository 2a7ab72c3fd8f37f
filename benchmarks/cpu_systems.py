"""The systems of the CPU throughput benchmark, one function each.

Each takes the same prompts (token ids) and generates ``gen`` tokens per prompt,
greedy, with end-of-sequence ignored, and returns its figures and the tokens.
Time starts after loading and a warm-up and covers prefill and decode. tiergen
and transformers are measured alike, in steady state: after a warm-up of the
whole workload (for transformers, its batch-size sweep), ``TIMED_RUNS`` more runs
of it at the chosen configuration, and the fastest of all runs at that
configuration is reported (the warm-up included: for transformers it is the sweep's
run at its best batch size); tiergen's first, cold call is kept beside.
``cpu_meter`` records how much CPU the run itself used and how much the rest of
the machine used meanwhile, so a run disturbed by other work can be told apart.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

HZ = os.sysconf("SC_CLK_TCK")
TIMED_RUNS = 2   # runs after the warm-up; the fastest run at the chosen configuration is reported


def _busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]   # idle + iowait
    return (sum(v[:8]) - idle) / HZ


@contextmanager
def cpu_meter(out: dict[str, Any]) -> Iterator[None]:
    """Fills out[wall_s, own_cpu_s, other_cpu_s]: other = machine busy time not ours."""
    b0, c0, t0 = _busy_s(), time.process_time(), time.perf_counter()
    yield
    wall, own = time.perf_counter() - t0, time.process_time() - c0
    out.update(wall_s=wall, own_cpu_s=own, other_cpu_s=max(0.0, _busy_s() - b0 - own),
               cores_used=own / wall)


# ---------------------------------------------------------------- tiergen
def run_tiergen(prompts: list[list[int]], gen: int, model: str, dtype: str | None = None,
                batch_size: int | None = None) -> dict[str, Any]:
    import torch
    from tiergen import LLM, SamplingParams
    kw: dict[str, Any] = {}
    if dtype:
        kw["dtype"] = dtype
    if batch_size:
        kw["batch_size"] = batch_size
    llm = LLM(model, **kw)
    params = SamplingParams(max_new_tokens=gen, ignore_eos=True)
    blocks = -(-len(prompts) // llm.policy.block_size)

    def run() -> dict[str, Any]:
        stamps: list[float] = []
        r: dict[str, Any] = {}
        with cpu_meter(r):
            t0 = time.perf_counter()
            outs = llm.generate(prompt_token_ids=prompts, params=params,
                                on_step=lambda: stamps.append(time.perf_counter()))
        r["tokens"] = [o.token_ids for o in outs]
        if blocks == 1:   # the first step of a single block is its prefill
            r["prefill_s"] = stamps[0] - t0
        return r
    cold = run()   # the warm-up: the first call also faults in its memory
    runs = [run() for _ in range(TIMED_RUNS)]
    res = dict(min([cold, *runs], key=lambda r: r["wall_s"]))
    if any(r["tokens"] != cold["tokens"] for r in runs):
        raise RuntimeError("tiergen's timed runs generated other tokens than its warm-up")
    res.update(system="tiergen", dtype=str(llm.dtype).replace("torch.", ""), threads=torch.get_num_threads(),
               batch_size=llm.batch_size, num_micro_batches=llm.num_micro_batches, blocks=blocks,
               cold_wall_s=cold["wall_s"], cold_prefill_s=cold.get("prefill_s"),
               timed_wall_s=[r["wall_s"] for r in runs])
    return res


# ---------------------------------------------------------------- transformers
def run_transformers(prompts: list[list[int]], gen: int, gguf: str, dtype: str = "bfloat16",
                     batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)) -> dict[str, Any]:
    """Runs all prompts at each batch size; reports the fastest run (its tokens and times)."""
    import torch
    from transformers import AutoModelForCausalLM
    d, f = os.path.split(gguf)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=getattr(torch, dtype)).eval()
    pad = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0

    @torch.inference_mode()
    def generate(ps: list[list[int]], bs: int) -> list[list[int]]:
        out = []
        for i in range(0, len(ps), bs):
            x = torch.tensor(ps[i:i + bs])   # equal-length prompts: no padding
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=gen, min_new_tokens=gen,
                               do_sample=False, pad_token_id=pad)
            out += y[:, x.shape[1]:].tolist()
        return out

    generate(prompts[:2], 2)
    sweep: dict[int, float] = {}
    best: dict[str, Any] = {}
    for bs in batch_sizes:
        r: dict[str, Any] = {}
        with cpu_meter(r):
            r["tokens"] = generate(prompts, bs)
        sweep[bs] = sum(map(len, r["tokens"])) / r["wall_s"]
        if sweep[bs] >= max(sweep.values()):
            best = {**r, "batch_size": bs}
    bs = best["batch_size"]
    runs = []
    for _ in range(TIMED_RUNS):   # steady state at the best batch size, as tiergen is timed
        r = {}
        with cpu_meter(r):
            r["tokens"] = generate(prompts, bs)
        runs.append(r)
    sweep_wall = best["wall_s"]
    best = {**min([best, *runs], key=lambda r: r["wall_s"]), "batch_size": bs}
    best.update(system="transformers", dtype=dtype, threads=torch.get_num_threads(),
                sweep_tok_s={str(k): round(v, 1) for k, v in sweep.items()}, sweep_prompts=len(prompts),
                sweep_wall_s=sweep_wall, timed_wall_s=[r["wall_s"] for r in runs])
    return best


# ---------------------------------------------------------------- llama.cpp
_QUIET: Any = None   # the log callback must outlive every llama.cpp call


def run_llama_cpp(prompts: list[list[int]], gen: int, gguf: str, threads: int = 2,
                  seq_counts: tuple[int, ...] = (16, 64, 256), sweep_prompts: int = 64,
                  n_batch: int = 2048, n_ubatch: int = 512) -> dict[str, Any]:
    """Batched decoding through llama.cpp's C API: ``n_seq`` sequences share every
    llama_decode call (prefill in n_batch-token batches, then one token per sequence).
    Sequence counts are swept on the first ``sweep_prompts`` prompts (256 on all of them)."""
    global _QUIET
    import llama_cpp as L
    _QUIET = L.llama_log_callback(lambda level, text, user: None)
    L.llama_log_set(_QUIET, None)   # its per-context chatter is megabytes over a sweep
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(gguf.encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {gguf}")
    vocab = L.llama_n_vocab(L.llama_model_get_vocab(model))
    plen = max(map(len, prompts))

    def make_ctx(n_seq: int) -> Any:
        cp = L.llama_context_default_params()
        cp.n_seq_max = n_seq
        cp.n_ctx = n_seq * (plen + gen)
        cp.n_batch, cp.n_ubatch = n_batch, min(n_ubatch, n_batch)
        cp.n_threads = cp.n_threads_batch = threads
        cp.kv_unified = False        # each sequence attends over its own cache only
        cp.no_perf = True
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def decode(ctx: Any, batch: Any, items: list[tuple[int, int, int, bool]]) -> np.ndarray | None:
        """items: (token, pos, seq, wants_logits); returns logits of the flagged rows."""
        batch.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, want
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        n_out = sum(1 for it in items if it[3])
        if not n_out:
            return None
        return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(n_out * vocab,)).reshape(n_out, vocab)

    def generate(ps: list[list[int]], n_seq: int) -> list[list[int]]:
        ctx = make_ctx(n_seq)
        batch = L.llama_batch_init(max(n_batch, n_seq), 0, 1)
        out: list[list[int]] = []
        try:
            for g0 in range(0, len(ps), n_seq):
                group = ps[g0:g0 + n_seq]
                L.llama_memory_clear(L.llama_get_memory(ctx), True)
                items = [(t, j, s, j == len(p) - 1) for s, p in enumerate(group) for j, t in enumerate(p)]
                last: dict[int, int] = {}
                for b0 in range(0, len(items), n_batch):
                    part = items[b0:b0 + n_batch]
                    lg = decode(ctx, batch, part)
                    if lg is not None:
                        seqs = [it[2] for it in part if it[3]]
                        for s, tok in zip(seqs, lg.argmax(-1).tolist()):
                            last[s] = tok
                toks = [[last[s]] for s in range(len(group))]
                for step in range(1, gen):
                    lg = decode(ctx, batch, [(toks[s][-1], len(group[s]) + step - 1, s, True)
                                             for s in range(len(group))])
                    for s, tok in enumerate(lg.argmax(-1).tolist()):
                        toks[s].append(tok)
                out += toks
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        return out

    generate(prompts[:2], 2)
    sweep: dict[int, float] = {}
    full: dict[str, Any] | None = None
    for n_seq in seq_counts:
        r: dict[str, Any] = {}
        ps = prompts if n_seq >= len(prompts) else prompts[:sweep_prompts]
        with cpu_meter(r):
            toks = generate(ps, n_seq)
        sweep[n_seq] = sum(map(len, toks)) / r["wall_s"]
        if len(ps) == len(prompts):
            full = {**r, "tokens": toks, "n_seq": n_seq}
    best = max(sweep, key=sweep.__getitem__)
    if full is None or full["n_seq"] != best:
        full = {}
        with cpu_meter(full):
            full["tokens"] = generate(prompts, best)
    full.update(system="llama.cpp", weights="Q4_1 (as in the GGUF)", threads=threads, n_seq=best,
                n_batch=n_batch, n_ubatch=n_ubatch,
                sweep_tok_s={str(k): round(v, 1) for k, v in sweep.items()}, sweep_prompts=sweep_prompts)
    L.llama_model_free(model)
    return full
