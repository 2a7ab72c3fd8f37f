"""Perplexity of the embedded SmolLM2 through the engine, with and without compression.

The text is CPython's own ``pydoc_data/topics.py`` (its ``topics`` values
joined), which ships with every CPython. Each row runs ``LLM.perplexity`` in
non-overlapping windows (window = stride), with the policy's real compressed
weights and/or KV cache: nothing is simulated. Prints a markdown table with
each row's change against bf16 and the stored bits per value.

    python benchmarks/ppl_table.py --tokens 16384 --out benchmarks/results/ppl_table.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tiergen import LLM, Policy  # noqa: E402
from tiergen.quant import WEIGHT_QUANT, KVQuantConfig, QuantConfig, quantized_nbytes  # noqa: E402


@dataclass(frozen=True)
class Row:
    note: str
    dtype: str = "bfloat16"
    policy: dict[str, Any] = field(default_factory=dict)


W = WEIGHT_QUANT
ROWS: dict[str, Row] = {
    "fp32": Row("float32 weights and cache", dtype="float32"),
    "bf16": Row("bfloat16 weights and cache: the baseline"),
    "w4": Row("4-bit weights, default (groups of 32 along the input dim)", policy=dict(compress_weight=True)),
    "w4-g64": Row("4-bit weights, groups of 64 along the input dim",
                  policy=dict(compress_weight=True, weight_quant=QuantConfig(4, 64, -1))),
    "w4-g64-out": Row("4-bit weights, groups of 64 along the output dim (FlexGen's layout)",
                      policy=dict(compress_weight=True, weight_quant=QuantConfig(4, 64, 0))),
    "kv4": Row("4-bit cache, default (KIVI: keys per channel over 64 tokens, values per token)",
               policy=dict(compress_cache=True)),
    "kv4-token": Row("4-bit cache, keys and values per token, groups of 64 (FlexGen's scheme)",
                     policy=dict(compress_cache=True, cache_quant=KVQuantConfig(per_channel_keys=False))),
    "w4+kv4": Row("4-bit weights and 4-bit cache, defaults", policy=dict(compress_weight=True, compress_cache=True)),
    "kv8": Row("8-bit cache (KIVI layout, groups of 64)", policy=dict(compress_cache=True,
                                                                    cache_quant=KVQuantConfig(bits=8))),
    "w3": Row("3-bit weights, groups of 32 along the input dim",
              policy=dict(compress_weight=True, weight_quant=QuantConfig(3, 32, -1))),
    "kv3": Row("3-bit cache (KIVI layout, groups of 64)", policy=dict(compress_cache=True,
                                                                    cache_quant=KVQuantConfig(bits=3))),
    "w3+kv3": Row("3-bit weights and cache", policy=dict(compress_weight=True, compress_cache=True,
                                                         weight_quant=QuantConfig(3, 32, -1),
                                                         cache_quant=KVQuantConfig(bits=3))),
}


def text() -> str:
    import pydoc_data.topics as topics
    return "\n\n".join(topics.topics.values())


def bits_per_value(row: Row, cfg: Any) -> dict[str, float]:
    """Stored bits per weight value (matrices) and per cache value, scales included."""
    p = row.policy
    dt = getattr(torch, row.dtype)
    out = {"weight_bits": 8.0 * dt.itemsize, "cache_bits": 8.0 * dt.itemsize}
    if p.get("compress_weight"):
        q = p.get("weight_quant", W)
        shape = (cfg.ffn_dim, cfg.hidden_size)
        out["weight_bits"] = 8 * quantized_nbytes(shape, dt, q) / (shape[0] * shape[1])
    if p.get("compress_cache"):
        kq = p.get("cache_quant", KVQuantConfig())
        n = 512   # one window of one head
        kb = quantized_nbytes((n, cfg.head_dim), dt, kq.key(0, -1))
        vb = quantized_nbytes((n, cfg.head_dim), dt, kq.value(-1))
        out["cache_bits"] = 8 * (kb + vb) / (2 * n * cfg.head_dim)
    return out


def run(name: str, ids: list[int], window: int, batch: int) -> dict[str, Any]:
    row = ROWS[name]
    llm = LLM("smollm2-135m", dtype=row.dtype, policy=Policy(gpu_batch_size=batch, **row.policy))
    t0 = time.perf_counter()
    r = llm.perplexity(token_ids=ids, window=window, stride=window)
    dt = time.perf_counter() - t0
    llm.close()
    return {"name": name, "note": row.note, "ppl": r.ppl, "scored_tokens": r.num_tokens, "seconds": round(dt, 1),
            **bits_per_value(row, llm.config)}


def table(rows: list[dict[str, Any]]) -> str:
    base = next((r["ppl"] for r in rows if r["name"] == "bf16"), None)
    lines = ["| config | perplexity | vs bf16 | weight bits | cache bits | what |", "|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        lines.append(f"| {r['name']} | {r['ppl']:.4f} | {rel} | {r['weight_bits']:.2f} | {r['cache_bits']:.2f} "
                     f"| {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16384, help="first N tokens of the text (0 = all)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="windows per micro-batch")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--out", default=None, help="write the rows and the machine as JSON here")
    args = ap.parse_args()
    tok = LLM("smollm2-135m").tokenizer
    ids = list(tok.encode(text()))
    ids = ids[:args.tokens] if args.tokens else ids
    rows = []
    for name in args.rows:
        rows.append(run(name, ids, args.window, args.batch))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        Path(args.out).write_text(json.dumps({
            "date": _dt.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "commit": commit, "tokens": len(ids), "window": args.window, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
