"""The faster compute dtype of this CPU, bfloat16 or float32, for ``dtype="auto"``.

The instruction set settles it at both ends: AMX multiplies bfloat16 tiles 4-10x faster
than float32 runs, and a CPU without AVX-512 BF16 has oneDNN emulate bfloat16 at a tenth
of float32's rate. In between (AVX-512 BF16 without AMX) the core decides: a 2-core Zen 4
runs SmolLM2's bfloat16 products 2.1x faster than float32, an earlier AVX-512-BF16 Xeon at
0.54x of it (BENCHMARKS.md §6). There the two are timed once per machine, on the oneDNN
call the engine makes, and the answer is kept beside the kernel builds, so every run on a
machine computes at the same dtype.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Callable

import torch

from . import kernels

# bfloat16 costs precision, so it is taken only where it is clearly faster
MIN_SPEEDUP = 1.25
PROBE_SHAPE = (256, 1024, 1024)   # rows, inputs, outputs: a mid-sized layer at the CPU batch


def flags() -> set[str]:
    return set(kernels.cpu_flags().split())


def has_amx_bf16() -> bool:
    return "amx_bf16" in flags()


def product_rate(dtype: torch.dtype, min_s: float = 0.15) -> float:
    """GFLOP/s of the engine's CPU product (a oneDNN-packed weight) at PROBE_SHAPE, best of repeats."""
    from .weights import prepack
    m, k, n = PROBE_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.03).to(dtype)
    call: Callable[[], torch.Tensor]
    if prepack.available(dtype):
        packed = prepack.pack(w)
        call = lambda: prepack.packed_linear(x, packed)   # noqa: E731
    else:
        call = lambda: torch.nn.functional.linear(x, w)   # noqa: E731
    call()
    best, spent = float("inf"), 0.0
    while spent < min_s:
        t = time.perf_counter()
        call()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return 2 * m * k * n / best / 1e9


def _record_path() -> str:
    return str(kernels.cache_dir().parent / "cpu_dtype.json")


def _machine_key() -> str:
    text = kernels.cpu_flags() + torch.__version__ + str(torch.get_num_threads())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_records(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):   # none yet, or unreadable: measure again
        return {}


def measured_choice() -> dict:
    """{"dtype", "float32_gflops", "bfloat16_gflops"} for this machine, measured once and kept."""
    path, key = _record_path(), _machine_key()
    records = _read_records(path)
    rec = records.get(key)
    if isinstance(rec, dict) and rec.get("dtype") in ("float32", "bfloat16"):
        return rec
    f32, bf16 = product_rate(torch.float32), product_rate(torch.bfloat16)
    rec = {"dtype": "bfloat16" if bf16 >= MIN_SPEEDUP * f32 else "float32",
           "float32_gflops": round(f32, 1), "bfloat16_gflops": round(bf16, 1)}
    records[key] = rec
    try:   # a read-only cache only costs the next start another probe
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
    return rec


@functools.lru_cache(maxsize=1)
def faster_cpu_dtype() -> torch.dtype:
    """bfloat16 with AMX; float32 without AVX-512 BF16; in between, what this machine measured."""
    if has_amx_bf16():
        return torch.bfloat16
    if "avx512_bf16" not in flags():
        return torch.float32
    return getattr(torch, measured_choice()["dtype"])
