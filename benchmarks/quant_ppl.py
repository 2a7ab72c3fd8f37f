"""Perplexity cost of group-wise quantization, simulated (quantize + dequantize)
on the embedded SmolLM2-135M, so it needs no engine changes.

The model is the embedded GGUF loaded into transformers' LlamaForCausalLM; the
text is CPython's own ``pydoc_data/topics.py`` (the values of its ``topics``
dict, joined), scored in fixed non-overlapping windows. Weights are replaced by
dequantize(quantize(w)); the KV cache is fake-quantized inside the attention
function, where keys are already rotated by RoPE (the cached keys are post-RoPE).

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/quant_ppl.py --configs fp32 bf16 w4-g64-in
    python benchmarks/quant_ppl.py --list
    python benchmarks/quant_ppl.py --table        # markdown table of the logged runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from tiergen.quant import QuantConfig, dequantize, quantize, quantized_nbytes

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTN_NAME = "tiergen_fakequant"
SEQ_DIM, HEAD_DIM = 2, 3   # transformers' key/value layout [batch, kv_heads, seq, head_dim]


@dataclass(frozen=True)
class Case:
    """One evaluated configuration."""
    dtype: torch.dtype = torch.float32
    weight: QuantConfig | None = None     # all linear weights of every layer
    embed: QuantConfig | None = None      # the (tied) token embedding / lm_head
    key: QuantConfig | None = None
    value: QuantConfig | None = None
    note: str = ""
    weight_shift: int = 0   # roll the input dim before grouping: groups straddle the source's Q4_1 blocks


def _cases() -> dict[str, Case]:
    f32, b16 = torch.float32, torch.bfloat16
    w = lambda bits, g, dim, **kw: QuantConfig(bits=bits, group_size=g, group_dim=dim, **kw)
    tok = lambda bits, g, **kw: QuantConfig(bits=bits, group_size=g, group_dim=HEAD_DIM, **kw)
    chan = lambda bits, g: QuantConfig(bits=bits, group_size=g, group_dim=SEQ_DIM)
    c: dict[str, Case] = {
        "fp32": Case(f32, note="reference"),
        "bf16": Case(b16, note="baseline"),
    }
    for g in (32, 64, 128):
        c[f"w4-g{g}-in"] = Case(f32, weight=w(4, g, -1), note=f"4-bit weights, groups of {g} along the input dim")
        c[f"w4-g{g}-out"] = Case(f32, weight=w(4, g, 0), note=f"4-bit weights, groups of {g} along the output dim")
    c["w4-g32-in-shift16"] = Case(f32, weight=w(4, 32, -1), weight_shift=16,
                                  note="groups of 32 along the input dim, offset by 16 from the GGUF's Q4_1 blocks")
    c["w4-g64-in-emb"] = Case(f32, weight=w(4, 64, -1), embed=w(4, 64, -1),
                              note="4-bit g64 input dim, also the tied embedding/lm_head")
    for bits, g in ((3, 32), (3, 64), (8, 64)):
        c[f"w{bits}-g{g}-in"] = Case(f32, weight=w(bits, g, -1),
                                     note=f"{bits}-bit weights, groups of {g} along the input dim")
    for bits in (3, 4, 8):
        for g in (16, 32, 64):
            c[f"kv{bits}-g{g}-tok"] = Case(f32, key=tok(bits, g), value=tok(bits, g),
                                           note=f"per token, groups of {g} along head_dim (FlexGen)")
            c[f"kv{bits}-g{g}-rot"] = Case(f32, key=tok(bits, g, rotate=True), value=tok(bits, g, rotate=True),
                                           note=f"Hadamard over head_dim, then groups of {g}")
            c[f"kv{bits}-g{g}-kivi"] = Case(f32, key=chan(bits, g), value=tok(bits, g),
                                            note=f"keys per channel over {g} tokens, values per token (KIVI)")
    for sd in (torch.float16, torch.bfloat16):
        name = str(sd).removeprefix("torch.")
        c[f"kv4-g64-tok-s{name}"] = Case(f32, key=tok(4, 64, scale_dtype=sd), value=tok(4, 64, scale_dtype=sd),
                                         note=f"mins/scales stored as {name}")
        c[f"w4-g64-in-s{name}"] = Case(f32, weight=w(4, 64, -1, scale_dtype=sd), note=f"mins/scales stored as {name}")
    return c


CASES = _cases()


def get_case(name: str) -> Case:
    """A case name; ``bf16:<name>`` runs it with bf16 compute (weights, cache and
    scales in bf16); ``a+b`` combines the weight settings of one case with the
    cache settings of another."""
    if name.startswith("bf16:"):
        c = get_case(name[5:])
        return replace(c, dtype=torch.bfloat16, note=c.note + ", bf16 compute")
    parts = [CASES[n] for n in name.split("+")]
    c = parts[0]
    for o in parts[1:]:
        c = replace(c, weight=c.weight or o.weight, embed=c.embed or o.embed, key=c.key or o.key,
                    value=c.value or o.value, weight_shift=c.weight_shift or o.weight_shift,
                    note=f"{c.note} + {o.note}")
    return c


def text_token_ids(tok: Any) -> list[int]:
    import pydoc_data.topics as topics  # ships with every CPython: stable, English, ~470k chars
    text = "\n\n".join(topics.topics.values())
    return tok(text)["input_ids"]


_MODELS: dict[torch.dtype, tuple[Any, Any, dict[str, torch.Tensor]]] = {}


def load_model(dtype: torch.dtype) -> tuple[Any, Any]:
    """The model in ``dtype`` with pristine weights (loaded once per process, since
    the GGUF dequantization takes longer than restoring the weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tiergen.weights.source import embedded_model_path

    if dtype not in _MODELS:
        path = embedded_model_path()
        d, f = os.path.dirname(path), os.path.basename(path)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        model.to(dtype).eval()
        pristine = {k: v.detach().clone() for k, v in model.state_dict().items()}
        _MODELS[dtype] = (model, AutoTokenizer.from_pretrained(d, gguf_file=f), pristine)
    model, tok, pristine = _MODELS[dtype]
    model.load_state_dict(pristine)
    model.set_attn_implementation("sdpa")
    return model, tok


def fake_quant(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    return dequantize(quantize(x, cfg))


@torch.no_grad()
def quantize_weights(model: Any, case: Case) -> dict[str, float]:
    """Replace weights in place; return bytes before/after for the table."""
    before = after = 0
    todo: list[tuple[torch.Tensor, QuantConfig]] = []
    if case.weight is not None:
        for layer in model.model.layers:
            for name in LINEARS:
                todo.append((layer.get_submodule(name).weight, case.weight))
    if case.embed is not None:  # tied: quantizing the embedding also quantizes lm_head
        todo.append((model.model.embed_tokens.weight, case.embed))
    for p, cfg in todo:
        before += p.numel() * 2     # vs a 16-bit model
        after += quantized_nbytes(p.shape, torch.bfloat16, cfg)  # as stored in a 16-bit model
        w = p.data.roll(case.weight_shift, -1) if case.weight_shift else p.data
        w = fake_quant(w, cfg)
        p.copy_(w.roll(-case.weight_shift, -1) if case.weight_shift else w)
    return {"weight_bits": 16 * after / before} if before else {}


def install_cache_quant(model: Any, case: Case) -> None:
    """Fake-quantize post-RoPE keys and values right where attention reads them."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attn(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             *args: Any, **kwargs: Any) -> Any:
        if case.key is not None:
            key = fake_quant(key, case.key)
        if case.value is not None:
            value = fake_quant(value, case.value)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME, attn)
    model.set_attn_implementation(ATTN_NAME)


@torch.no_grad()
def perplexity(model: Any, ids: list[int], window: int, progress: bool) -> tuple[float, int]:
    nll, count = 0.0, 0
    for i, b in enumerate(range(0, len(ids) - 1, window)):
        x = torch.tensor([ids[b:b + window]])
        if x.shape[1] < 2:
            break
        logits = model(x, use_cache=False).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None])
        nll -= float(lp.double().sum())
        count += x.shape[1] - 1
        if progress and i % 10 == 0:
            print(f"  window {i}: running ppl {math.exp(nll / count):.4f}", flush=True)
    return math.exp(nll / count), count


def cache_bits(cfg: QuantConfig | None, head_dim: int, window: int) -> float:
    """Stored bits per cached value (16 for an unquantized 16-bit cache)."""
    if cfg is None:
        return 16.0
    shape = (1, 1, window, head_dim)
    return 8 * quantized_nbytes(shape, torch.bfloat16, cfg) / (window * head_dim)


def run(name: str, tokens: int, window: int, log: str, progress: bool) -> dict[str, Any]:
    case = get_case(name)
    t0 = time.time()
    model, tok = load_model(case.dtype)
    ids = text_token_ids(tok)[:tokens]
    info = quantize_weights(model, case)
    if case.key is not None or case.value is not None:
        install_cache_quant(model, case)
    hd = model.config.head_dim
    ppl, count = perplexity(model, ids, window, progress)
    row = {"name": name, "ppl": ppl, "scored_tokens": count, "tokens": len(ids), "window": window,
           "dtype": str(case.dtype).removeprefix("torch."), "note": case.note,
           "weight_bits": info.get("weight_bits", 16.0),
           "key_bits": cache_bits(case.key, hd, window), "value_bits": cache_bits(case.value, hd, window),
           "seconds": round(time.time() - t0, 1)}
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
    return row


@torch.no_grad()
def scale_dtype_table(ids: list[int], window: int) -> str:
    """Error vs bytes of storing mins/scales as float32, bfloat16 or float16: relative
    RMS error over all linear weights and over the keys/values of one window."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model, _ = load_model(torch.float32)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def grab(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             *args: Any, **kwargs: Any) -> Any:
        kv.append((key.clone(), value.clone()))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_NAME + "_grab", grab)
    model.set_attn_implementation(ATTN_NAME + "_grab")
    model(torch.tensor([ids[:window]]), use_cache=False)
    weights = [layer.get_submodule(n).weight.detach() for layer in model.model.layers for n in LINEARS]
    groups = {"weights (groups of 64, input dim)": (weights, -1),
              "keys (per channel, 64 tokens)": ([k for k, _ in kv], SEQ_DIM),
              "values (per token, 64 along head_dim)": ([v for _, v in kv], HEAD_DIM)}
    out = ["| tensors | bits | scale dtype | bits/value | relative RMS error |", "|---|---:|---|---:|---:|"]
    for label, (ts, dim) in groups.items():
        for bits in (4, 8):
            for sd in (torch.float32, torch.bfloat16, torch.float16):
                cfg = QuantConfig(bits=bits, group_size=64, group_dim=dim, scale_dtype=sd)
                err = sum(float((fake_quant(t, cfg) - t).double().pow(2).sum()) for t in ts)
                ref = sum(float(t.double().pow(2).sum()) for t in ts)
                nb = sum(quantized_nbytes(t.shape, t.dtype, cfg) for t in ts)
                n = sum(t.numel() for t in ts)
                name = str(sd).removeprefix("torch.")
                out.append(f"| {label} | {bits} | {name} | {8 * nb / n:.3f} | {math.sqrt(err / ref):.5f} |")
    return "\n".join(out)


def table(log: str) -> str:
    rows: dict[str, dict[str, Any]] = {}
    with open(log) as f:
        for line in f:
            r = json.loads(line)
            rows[r["name"]] = r   # the latest run of a name wins
    ref = {k: rows[k]["ppl"] for k in ("fp32", "bf16") if k in rows}
    out = ["| config | what | compute | weight bits | K/V bits | ppl | vs bf16 | vs fp32 |",
           "|---|---|---|---:|---:|---:|---:|---:|"]
    pct: Callable[[float, str], str] = (
        lambda p, k: f"{100 * (p / ref[k] - 1):+.2f}%" if k in ref else "n/a")
    for r in rows.values():
        out.append(f"| `{r['name']}` | {r['note']} | {r['dtype']} | {r['weight_bits']:.2f} | "
                   f"{r['key_bits']:.2f}/{r['value_bits']:.2f} | {r['ppl']:.4f} | "
                   f"{pct(r['ppl'], 'bf16')} | {pct(r['ppl'], 'fp32')} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="*", default=[], help="case names; 'bf16:<name>' for bf16 compute")
    ap.add_argument("--tokens", type=int, default=61440, help="first N tokens of the text (default 61440)")
    ap.add_argument("--window", type=int, default=512, help="window = stride (default 512)")
    ap.add_argument("--log", default="/tmp/quant_ppl.jsonl", help="JSON lines, one per run (appended)")
    ap.add_argument("--list", action="store_true", help="list the case names")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --log")
    ap.add_argument("--scale-dtypes", action="store_true", help="print the error vs bytes of each scale dtype")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.list:
        for k, c in CASES.items():
            print(f"{k:24s} {c.note}")
    for name in args.configs:
        r = run(name, args.tokens, args.window, args.log, args.progress)
        print(f"{name}: ppl {r['ppl']:.4f} over {r['scored_tokens']} tokens ({r['seconds']} s)", flush=True)
    if args.scale_dtypes:
        _, tok = load_model(torch.float32)
        print(scale_dtype_table(text_token_ids(tok), args.window))
    if args.table:
        print(table(args.log))


if __name__ == "__main__":
    main()
