"""Hugging Face Accelerate disk offload, one batch size, one JSON line out.

Loads a model dir with ``device_map="auto"``, ``max_memory={"cpu": ...}`` and an
``offload_folder``: on a CPU-only machine what does not fit in ``cpu`` goes to
``disk`` and is read back for every forward pass (row-by-row: all layers for
the whole batch, once per generated token). Greedy generation of exactly
``--gen-len`` tokens for ``--batch`` random prompts, after one small warm-up.

Prefill and decode are split by a logits processor that timestamps every
generation step: its first call comes right after the prefill forward pass.

    python benchmarks/run_accelerate.py --model-dir DIR --batch 8 --prompt-len 32 \\
        --gen-len 8 --cpu-mem 1GiB --offload-dir /tmp/tiergen-bench/acc-offload
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.cgroup import parse_bytes  # noqa: E402


class StepTimer:
    """A LogitsProcessor that only records when each step's logits arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def device_map_summary(model: torch.nn.Module, cpu_mem: int) -> dict[str, object]:
    """Where Accelerate put each module, with parameter bytes per device."""
    dmap: dict[str, str] = dict(getattr(model, "hf_device_map", None) or {"": "cpu"})
    keys = sorted(dmap, key=len, reverse=True)
    per_dev: dict[str, int] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        key = next((k for k in keys if k == "" or name == k or name.startswith(k + ".")), "")
        dev = str(dmap.get(key, "cpu"))
        ident = id(p)
        if ident in seen:  # tied weights count once
            continue
        seen.add(ident)
        per_dev[dev] = per_dev.get(dev, 0) + p.numel() * p.element_size()
    layers: dict[str, list[int]] = {}
    for k, dev in dmap.items():
        parts = k.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            layers.setdefault(str(dev), []).append(int(parts[parts.index("layers") + 1]))
    return {
        "max_memory_cpu": cpu_mem,
        "bytes_per_device": per_dev,
        "layers_per_device": {d: sorted(v) for d, v in layers.items()},
        "num_layers_per_device": {d: len(v) for d, v in layers.items()},
        "other_modules": {k: str(v) for k, v in dmap.items() if ".layers." not in f".{k}."},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--cpu-mem", default="1GiB", help="Accelerate's max_memory['cpu'] (e.g. 1GiB)")
    ap.add_argument("--offload-dir", default="/tmp/tiergen-bench/accelerate-offload")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="compute and offload dtype (float32 doubles the bytes read back from disk)")
    ap.add_argument("--no-warmup", action="store_true")
    a = ap.parse_args(argv)
    if a.gen_len < 2:
        ap.error("--gen-len must be at least 2 (one prefill token + decode steps)")

    from transformers import AutoModelForCausalLM, LogitsProcessorList
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    if a.threads:
        torch.set_num_threads(a.threads)
    cpu_mem = parse_bytes(a.cpu_mem)
    Path(a.offload_dir).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        a.model_dir, dtype=getattr(torch, a.dtype), device_map="auto",
        max_memory={"cpu": cpu_mem}, offload_folder=a.offload_dir)
    model.eval()
    load_s = time.perf_counter() - t0
    summary = device_map_summary(model, cpu_mem)

    cfg = model.config
    gen = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(4, cfg.vocab_size, (a.batch, a.prompt_len), generator=gen)
    mask = torch.ones_like(prompts)
    common = dict(do_sample=False, num_beams=1, use_cache=True, pad_token_id=cfg.pad_token_id,
                  eos_token_id=None)

    warm_s = 0.0
    if not a.no_warmup:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=2,
                           min_new_tokens=2, **common)
        warm_s = time.perf_counter() - t0

    timer = StepTimer()
    with torch.inference_mode():
        t_start = time.perf_counter()
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=a.gen_len,
                             min_new_tokens=a.gen_len, logits_processor=LogitsProcessorList([timer]),
                             **common)
        t_end = time.perf_counter()
    new = out.shape[1] - a.prompt_len
    if new != a.gen_len or len(timer.times) != a.gen_len:
        print(f"run_accelerate: expected {a.gen_len} new tokens, got {new} "
              f"({len(timer.times)} steps)", file=sys.stderr)
        return 2

    prefill_s = timer.times[0] - t_start
    decode_s = t_end - timer.times[0]   # gen_len - 1 decode forward passes
    total_s = t_end - t_start
    steps = [b - a_ for a_, b in zip(timer.times, timer.times[1:])]
    B, P, G = a.batch, a.prompt_len, a.gen_len
    print(json.dumps({
        "system": "accelerate", "batch": B, "dtype": a.dtype, "prompt_len": P, "gen_len": G,
        "prefill_s": round(prefill_s, 4), "decode_s": round(decode_s, 4), "total_s": round(total_s, 4),
        "gen_tokens": B * G,
        "prefill_tok_s": B * P / prefill_s,
        "decode_tok_s": B * (G - 1) / decode_s,
        "total_tok_s": B * G / total_s,
        "decode_step_s": [round(s, 4) for s in steps],
        "load_s": round(load_s, 2), "warmup_s": round(warm_s, 2),
        "threads": torch.get_num_threads(),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "device_map_summary": summary,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "accelerate": _version("accelerate")},
    }))
    return 0


def _version(pkg: str) -> str:
    try:
        from importlib.metadata import version
        return version(pkg)
    except Exception:  # noqa: BLE001 - informational only
        return "?"


if __name__ == "__main__":
    sys.exit(main())
