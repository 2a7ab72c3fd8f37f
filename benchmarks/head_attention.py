"""The bfloat16 LM head and prompt attention: tiergen's kernels against what serves without them.

The head: the greedy argmax over a vocabulary, the head kernel (AMX tiles or AVX-512 BF16
dot products: tiergen/kernels/lm_head*.cpp, float32 logits) against oneDNN's product over
packed vocabulary slices with the running argmax (bfloat16 logits). Prompt attention: the
kernel (tiergen/kernels/prefill_attention.cpp) against SDPA's CPU kernel, causal, grouped
heads. The two of each pair alternate, every figure is the best of ``--repeats`` calls.

    python benchmarks/head_attention.py              # SmolLM2-135M's shapes, 256 x 64-token prompts
                                                     # (and its int8-screened greedy head, on real text)
    python benchmarks/head_attention.py --vocab 128256 --hidden 2048 --heads 32 --kv-heads 8
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Best seconds of each fn over ``repeats`` rounds, the fns taking turns."""
    from benchmarks.memory_peak import best_of
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            best[k] = min(best[k], best_of(f, 1))
    return best


def head(a: argparse.Namespace) -> None:
    from tiergen import kernels
    from tiergen.weights import prepack
    mod, rw = kernels.head_kernel(), kernels.load("rowwise")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(a.vocab, a.hidden, generator=g) * 0.05).bfloat16()
    packed = prepack.PackedRows(w, 8192)
    for rows in a.rows:
        h = torch.randn(rows, a.hidden, generator=g).bfloat16()

        def onednn() -> None:
            best, arg = torch.empty(rows), torch.empty(rows, dtype=torch.long)
            for i, (c0, part) in enumerate(packed.slices()):
                rw.argmax_update(prepack.packed_linear(h, part), best, arg, c0, i == 0)
        t = alternate({"kernel": lambda: mod.argmax(h, w), "oneDNN": onednn}, a.repeats)
        flop = 2 * rows * a.hidden * a.vocab
        print(f"head {rows:5d} rows x {a.hidden} -> {a.vocab}: kernel {t['kernel'] * 1e3:7.2f} ms "
              f"({flop / t['kernel'] / 1e9:4.0f} GFLOP/s), oneDNN slices {t['oneDNN'] * 1e3:7.2f} ms "
              f"({flop / t['oneDNN'] / 1e9:4.0f}): {t['oneDNN'] / t['kernel']:.2f}x")


def screened_head(a: argparse.Namespace) -> None:
    """The int8-screened greedy head (weights/screen.py) against the head kernel it reproduces,
    on the embedded model's own head and final features of real text (the screen's work depends
    on them: random features would say little)."""
    from benchmarks.real_prompts import token_windows
    from tiergen import LLM, SamplingParams, kernels
    from tiergen.weights import screen
    mod, plain = kernels.load("head_screen"), kernels.load("lm_head_avx512")
    if mod is None or plain is None:
        print("screened head: needs AVX-512 VNNI and BF16")
        return
    llm = LLM("smollm2-135m")
    seen = []
    orig = screen.greedy

    def spy(h: torch.Tensor, w: torch.Tensor):
        seen.append((h.clone(), w))
        return orig(h, w)

    screen.greedy = spy
    try:
        llm.generate(prompt_token_ids=token_windows(llm.tokenizer, 256, 64),
                     params=SamplingParams(max_new_tokens=4, ignore_eos=True))
    finally:
        screen.greedy = orig
    (first, w), (h, _) = seen[0], seen[-1]
    sc = screen.Screen.make(w, first)
    ids, candidates = sc.argmax(mod, h, w)
    assert torch.equal(ids, plain.argmax(h, w))
    t = alternate({"screen": lambda: sc.argmax(mod, h, w), "kernel": lambda: plain.argmax(h, w)}, a.repeats)
    print(f"screened head {h.shape[0]} rows x {w.shape[1]} -> {w.shape[0]} (SmolLM2, real text): screen "
          f"{t['screen'] * 1e3:.2f} ms ({candidates / h.shape[0]:.1f} candidates a row), head kernel "
          f"{t['kernel'] * 1e3:.2f} ms: {t['kernel'] / t['screen']:.2f}x")


def prompt_attention(a: argparse.Namespace) -> None:
    from tiergen import kernels
    mod = kernels.load("prefill_attention")
    g = torch.Generator().manual_seed(1)
    B, T, D = a.prompts, a.prompt_len, a.head_dim
    q = torch.randn(B, a.heads, T, D, generator=g).bfloat16()
    k = torch.randn(B, a.kv_heads, T, D, generator=g).bfloat16()
    v = torch.randn(B, a.kv_heads, T, D, generator=g).bfloat16()
    mask = torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)
    t = alternate({"kernel": lambda: mod.prefill_attention(q, k, v, mask, D ** -0.5),
                   "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)},
                  a.repeats)
    print(f"prompt attention {B} x {T} tokens, {a.heads}/{a.kv_heads} heads of {D}: kernel "
          f"{t['kernel'] * 1e3:.2f} ms a layer, SDPA {t['SDPA'] * 1e3:.2f} ms: {t['SDPA'] / t['kernel']:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    from tiergen import kernels
    if kernels.head_kernel() is None or kernels.load("prefill_attention") is None:
        print("the kernels cannot be built or used on this CPU (they need AVX-512 BF16)", file=sys.stderr)
        return 1
    print(f"threads {torch.get_num_threads()}, head kernel {kernels.head_kernel().__name__}")
    head(a)
    if a.hidden == 576 and a.vocab == 49152:
        screened_head(a)
    prompt_attention(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
