"""Time to load the embedded SmolLM2 GGUF: tiergen vs transformers, side by side.

Each load runs in a fresh process (imports excluded from the load time, page
cache warm for both: the file is read once before timing), repeated --repeat
times; the median is reported with the ratio.

    python benchmarks/load_time.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

TIERGEN = """
import time, torch
from tiergen import LLM
t = time.perf_counter(); llm = LLM("smollm2-135m"); dt = time.perf_counter() - t
print(dt)
"""

TRANSFORMERS = """
import os, time, torch
from tiergen.weights.source import embedded_model_path
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = os.path.split(embedded_model_path())
t = time.perf_counter()
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.bfloat16)
print(time.perf_counter() - t)
"""


def timed(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1",
                              "PATH": "/usr/bin:/bin", **{k: v for k, v in __import__("os").environ.items()
                                                          if k in ("HOME", "PYTHONPATH")}})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    from tiergen.weights.source import embedded_model_path
    with open(embedded_model_path(), "rb") as f:   # warm the page cache for both
        while f.read(1 << 24):
            pass
    res = {"tiergen": [], "transformers": []}
    for _ in range(a.repeat):
        res["tiergen"].append(timed(TIERGEN))
        res["transformers"].append(timed(TRANSFORMERS))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(json.dumps({"runs": res, "median_s": med, "ratio": med["transformers"] / med["tiergen"]}))
    print(f"tiergen {med['tiergen']:.2f} s, transformers {med['transformers']:.2f} s "
          f"(model + tokenizer, bf16): transformers / tiergen = {med['transformers'] / med['tiergen']:.1f}x")


if __name__ == "__main__":
    main()
