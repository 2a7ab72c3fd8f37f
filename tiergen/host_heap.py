"""Handing freed host memory back to the OS (glibc only; a no-op elsewhere).

A forward pass frees many mid-sized buffers of changing sizes (activations,
cast weight groups, KV prefixes that grow by a token per step). glibc keeps
freed chunks below its mmap threshold in the heap, and fragmentation stops it
from reusing them: on OPT-1.3B at 48x4 the process grew by ~1 GiB over one
prefill that the runtime never held, which OOM-killed runs under a 2 GiB cap.
``release_if_grown`` returns that memory whenever the process has grown by
more than a threshold since it last looked, so what the tiers account is what
the process uses.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import mmap
import os
from typing import Any

import torch

# Growth of the process's anonymous memory since the last look that prompts a trim: small
# enough to matter under a tight cap, large enough that trims (and the page faults that
# follow them) stay rare. A host-computed pass may keep its planned scratch on top
# (Engine.heap_limit), which its next layer reuses.
GROWTH_LIMIT = 128 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):   # not glibc
        return None


_LIBC = _libc()
_low = [None]   # the lowest anonymous RSS seen since the last trim


_statm: list[int | None] = [None, None]   # (pid, fd): /proc/self names the process that opened it


def anon_resident() -> int:
    """Resident anonymous bytes of this process (resident minus file-backed pages)."""
    try:
        # one open file read again in place: the engine asks after every layer, and an
        # open/read/close there took ~2 ms of a SmolLM2 decode step
        if _statm[0] != os.getpid():
            _statm[:] = [os.getpid(), os.open("/proc/self/statm", os.O_RDONLY)]
        _, resident, shared = os.pread(_statm[1], 256, 0).split()[:3]
        return (int(resident) - int(shared)) * _PAGE
    except (OSError, ValueError):
        return 0


def release() -> None:
    """Return every free heap page to the OS now."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    _low[0] = anon_resident()


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks below this come from the heap, where a freed one is reused by the next pass's
# allocation of its size instead of being unmapped and faulted in afresh.
MMAP_THRESHOLD = 64 << 20


def reuse_freed_blocks() -> bool:
    """Keep freed mid-sized blocks in the heap for reuse, for a process that computes on the
    host: by default glibc maps each block over its (adaptive) threshold afresh and gives the
    top of the heap back on every free, so a SmolLM2 prefill at 256 x 64 took 630k page faults
    (1.2 s of system time). ``release_if_grown`` still returns real growth to the OS."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def release_if_grown(limit: int = GROWTH_LIMIT) -> bool:
    """Trim the heap if anonymous memory grew by more than ``limit`` since the lowest
    point after the last trim; growth that is live memory is then the new floor."""
    if _LIBC is None:
        return False
    now = anon_resident()
    if _low[0] is None or now < _low[0]:
        _low[0] = now
        return False
    if now - _low[0] <= limit:
        return False
    release()
    return True


HUGE_PAGE = 2 << 20
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def anonymous_bytes(nbytes: int, align: int, huge: bool = False) -> torch.Tensor:
    """``nbytes`` of fresh anonymous mmap memory as a uint8 tensor starting on an
    ``align`` boundary (a power of two); ``huge`` asks the kernel for 2 MiB pages."""
    page = mmap.PAGESIZE
    cap = max(page, -(-nbytes // page) * page) + (align - page if align > page else 0)
    mm = mmap.mmap(-1, cap, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
        # Fault the whole buffer in at once: a head-major cache's first writes touch every
        # 2 MiB page anyway, and one by one each fault may stop to compact memory (755 MB of
        # a fresh process: 0.38 s touched, 0.12 s populated). Linux 5.14+; elsewhere a no-op.
        try:
            mm.madvise(MADV_POPULATE_WRITE)
        except OSError:
            pass
    # The tensor holds a memoryview, and a live memoryview export makes mmap.close()
    # fail, so the mapping cannot be unmapped while any view of the tensor exists
    # (torch.frombuffer keeps a reference to the object it is given but drops the
    # buffer export, so handing it the mmap itself would let a close() leave the
    # tensor dangling).
    flat = torch.frombuffer(memoryview(mm), dtype=torch.uint8)
    skip = (-flat.data_ptr()) % align
    return flat[skip:skip + nbytes]


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor on memory the kernel may back with 2 MiB pages.

    For large buffers written and read in scattered rows, like a head-major KV
    cache whose every decode step writes one column of each of B x Hkv rows:
    with 4 KiB pages each such write touches hundreds of pages and pays a TLB
    miss (and at first a page fault) for each. Where transparent huge pages
    are off, or for small buffers, this is ordinary memory.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 4 * HUGE_PAGE:
        return torch.empty(shape, dtype=dtype)
    return anonymous_bytes(nbytes, HUGE_PAGE, huge=True).view(dtype).view(shape)
