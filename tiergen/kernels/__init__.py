"""Compiled CPU kernels: built from source on first use with torch's extension
loader, cached per machine, and skipped (the torch path runs) wherever they cannot
be built -- no compiler, no ninja, an instruction set they do not target.

Set ``TIERGEN_KERNELS=0`` to keep to the torch path.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

SOURCES = {"decode_attention": Path(__file__).with_name("decode_attention.cpp"),
           "rowwise": Path(__file__).with_name("rowwise.cpp"),
           "decode_attention_f32": Path(__file__).with_name("decode_attention_f32.cpp"),
           "prefill_attention": Path(__file__).with_name("prefill_attention.cpp"),
           "lm_head": Path(__file__).with_name("lm_head.cpp"),
           "lm_head_avx512": Path(__file__).with_name("lm_head_avx512.cpp"),
           "linear": Path(__file__).with_name("linear.cpp"),
           "linear_avx512": Path(__file__).with_name("linear_avx512.cpp"),
           "head_screen": Path(__file__).with_name("head_screen.cpp")}
# the kernels each compute dtype calls (the float32 ones need only AVX2 and FMA)
# (the LM head's and the layer products': HEAD_KERNELS and LINEAR_KERNELS, each tried in turn)
BY_DTYPE = {torch.bfloat16: ("decode_attention", "rowwise", "prefill_attention"),
            torch.float32: ("decode_attention_f32",)}
# the LM head's kernels, the first that serves taken: AMX tiles, else AVX-512 BF16 dot products
HEAD_KERNELS = ("lm_head", "lm_head_avx512")
# (head_screen: the AVX-512 head's greedy argmax screened in int8, weights/screen.py)
# the layer products' kernels (one packed weight layout for both), tried in the same way
LINEAR_KERNELS = ("linear", "linear_avx512")
# the CPU flag each kernel needs beyond AVX-512 BF16: without it the build is not even tried
# (a first run on a CPU without AMX would spend a minute building two kernels it cannot use)
REQUIRES = {"lm_head": "amx_bf16", "linear": "amx_bf16", "head_screen": "avx512_vnni"}
# -march=native: the kernel is built on and for the machine that runs it
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]

_lock = threading.Lock()
_built: dict[str, ModuleType | None] = {}
_UNBUILT = object()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tiergen" / "kernels"


def enabled() -> bool:
    return os.environ.get("TIERGEN_KERNELS", "1") != "0"


def load(name: str) -> ModuleType | None:
    """The built kernel module ``name``, or None where it cannot be built or used here."""
    if not enabled():
        return None
    mod = _built.get(name, _UNBUILT)   # called for every op: the lock only for a first build
    if mod is not _UNBUILT:
        return mod
    with _lock:
        if name not in _built:
            _built[name] = _build(name)
        return _built[name]


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _clear_stale_lock(where: Path, max_age_s: float = 600.0) -> None:
    """torch's loader waits while a build's lock file exists; one left by a build that was
    killed would make every later start wait forever. No build takes ten minutes."""
    lock = where / "lock"
    try:
        if time.time() - lock.stat().st_mtime > max_age_s:
            lock.unlink()
    except FileNotFoundError:
        pass


def _staged(src: Path, where: Path) -> Path:
    """The kernel's source and the headers copied into its build directory (named by their
    content), so every checkout builds the same paths: ninja rebuilds when a command line
    changes, and two checkouts sharing the cache would otherwise rebuild each other's kernels."""
    for f in (src, *sorted(src.parent.glob("*.h"))):
        dst = where / f.name
        if not dst.exists():   # written whole or not at all: a concurrent build may read it
            tmp = where / f".{f.name}.{os.getpid()}.tmp"
            tmp.write_bytes(f.read_bytes())
            os.replace(tmp, dst)
    return where / src.name


def _build(name: str) -> ModuleType | None:
    if name in REQUIRES and REQUIRES[name] not in cpu_flags().split():
        return None
    src = SOURCES[name]
    # one build per source, flags, torch and CPU: a changed kernel never loads a stale build, and
    # a cache shared by machines never hands one a build for another's instruction set
    headers = b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(CFLAGS).encode() + torch.__version__.encode()
                         + cpu_flags().encode())
    tag = f"tiergen_{name}_{key.hexdigest()[:12]}"
    where = cache_dir() / tag
    try:
        where.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(where)
        if not any(where.glob(f"{tag}*.so")):
            print(f"tiergen: building the CPU {name.replace('_', '-')} kernel (once per machine, "
                  f"about half a minute)", file=sys.stderr, flush=True)
        from torch.utils.cpp_extension import load as build
        mod = build(tag, sources=[str(_staged(src, where))], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(where), verbose=False)
        return mod if mod.available() else None
    except Exception:   # no compiler, no ninja, an unsupported CPU: the torch path serves
        return None


def for_dtype(dtype: torch.dtype, name: str, *tensors: torch.Tensor) -> ModuleType | None:
    """Kernel module ``name`` where it applies to ``tensors``: CPU tensors of ``dtype`` whose
    last dimension is contiguous, the layout every kernel here reads."""
    if all(t.is_cpu and t.dtype == dtype and t.stride(-1) == 1 for t in tensors):
        return load(name)
    return None


def for_bf16(name: str, *tensors: torch.Tensor) -> ModuleType | None:
    return for_dtype(torch.bfloat16, name, *tensors)


def first_of(names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that builds and serves here, or None."""
    return next((name for name in names if load(name) is not None), None)


def head_kernel() -> ModuleType | None:
    """The bfloat16 LM head kernel this CPU runs (float32 logits), or None."""
    name = first_of(HEAD_KERNELS)
    return None if name is None else load(name)


def linear_kernel() -> ModuleType | None:
    """The bfloat16 layer-product kernel this CPU runs (weights/tiles.py), or None."""
    name = first_of(LINEAR_KERNELS)
    return None if name is None else load(name)


def warm(host_compute: bool, dtype: torch.dtype) -> None:
    """Build (or load) now the kernels a run on the host at ``dtype`` will call, so the
    one-time build does not land inside the first generation."""
    if host_compute:
        for name in BY_DTYPE.get(dtype, ()):
            load(name)
        if dtype == torch.bfloat16:
            if first_of(HEAD_KERNELS) == "lm_head_avx512":
                load("head_screen")   # weights/screen.py: the AVX-512 head's greedy ids, screened
            linear_kernel()
