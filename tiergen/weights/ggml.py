"""ggml tensor types and their dequantization into torch tensors.

Vectorized numpy kernels for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K and Q6_K,
bit-identical to ``gguf.quants``; any other type goes through that package.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from ..errors import CheckpointError

# ggml tensor type ids (ggml.h); only the ones we treat specially are named.
F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K = 0, 1, 2, 3, 8, 12, 14
I8, I16, I32, I64, F64, BF16 = 24, 25, 26, 27, 28, 30

# type id -> (elements per block, bytes per block) for the types decoded here;
# any other type's sizes come from the gguf package's table.
_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    F32: (1, 4), F16: (1, 2), BF16: (1, 2), F64: (1, 8),
    I8: (1, 1), I16: (1, 2), I32: (1, 4), I64: (1, 8),
    Q4_0: (32, 18), Q4_1: (32, 20), Q8_0: (32, 34), Q4_K: (256, 144), Q6_K: (256, 210),
}


def ggml_type_name(ggml_type: int) -> str:
    """``Q4_K`` for 12, and so on; ``type 99`` for ids gguf does not know."""
    from gguf import GGMLQuantizationType  # lazy: only for messages

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def _block_sizes(ggml_type: int) -> tuple[int, int] | None:
    sizes = _BLOCK_SIZES.get(ggml_type)
    if sizes is None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            sizes = GGML_QUANT_SIZES.get(GGMLQuantizationType(ggml_type))
        except ValueError:
            return None
    return sizes


# --------------------------------------------------------------------- parsing


# -------------------------------------------------------------- dequantizing
# Kernels are numpy, not torch, on purpose: torch's elementwise ops fork into
# OpenMP regions whose threads spin-wait, and on a busy 2-core machine that
# turned a 0.3 s model decode into 10-30 s. numpy releases the GIL and never
# spins, so chunks run on a small thread pool instead.
#
# Each kernel decodes ``b`` (n blocks of raw bytes, uint8 (n, type_size)) into
# ``out`` (float32 (n, block_size)), with the same float32 operations, in the
# same order, as gguf.quants, so results are bit-identical.
Kernel = Callable[[np.ndarray, np.ndarray], None]


def _half(b: np.ndarray, col: int) -> np.ndarray:
    """The fp16 at byte column ``col`` of every block, as float32 (n, 1)."""
    return b[:, col:col + 2].view(np.float16).astype(np.float32)


def _k_f32(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = b.view(np.float32)


def _k_f16(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = b.view(np.float16)


def _k_bf16(b: np.ndarray, out: np.ndarray) -> None:
    bits = out.view(np.uint32)  # bf16 is the top half of a float32
    bits[:] = b.view(np.uint16)
    bits <<= 16


def _k_q8_0(b: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, 32 x int8 q; x = q * d
    np.multiply(b[:, 2:].view(np.int8), _half(b, 0), out=out)


def _unpack_nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """16 packed bytes per block -> 32 values: low nibbles, then high ones."""
    out[:, :16] = qs & 0x0F
    out[:, 16:] = qs >> 4


def _k_q4_0(b: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, 16 bytes of 4-bit q; x = (q - 8) * d
    _unpack_nibbles(b[:, 2:], out)
    out -= 8.0
    out *= _half(b, 0)


def _k_q4_1(b: np.ndarray, out: np.ndarray) -> None:
    # block of 32: fp16 d, fp16 m, 16 bytes of 4-bit q; x = q * d + m
    _unpack_nibbles(b[:, 4:], out)
    out *= _half(b, 0)
    out += _half(b, 2)


def _q4k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of a Q4_K super-block -> 8 six-bit scales and 8
    six-bit mins. Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of
    scales 4-7; bytes 4-7 the same for mins; bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and of mins 4-7 (high nibble)."""
    a, m, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = np.concatenate((a & 63, (c & 0x0F) | ((a >> 6) << 4)), axis=1)
    mins = np.concatenate((m & 63, (c >> 4) | ((m >> 6) << 4)), axis=1)
    return scale, mins


def _k_q4_k(b: np.ndarray, out: np.ndarray) -> None:
    # super-block of 256: fp16 d, fp16 dmin, 12 scale bytes, 128 bytes of 4-bit
    # q. Sub-block j (32 values) is x = (d*scale_j) * q - dmin*min_j; the q
    # bytes come in 4 runs of 32: low nibbles are sub-block 2r, high ones 2r+1.
    n = b.shape[0]
    scale, mins = _q4k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(n, 4, 32)
    sub = out.reshape(n, 8, 32)
    sub[:, 0::2] = qs & 0x0F
    sub[:, 1::2] = qs >> 4
    sub *= (_half(b, 0) * scale.astype(np.float32))[:, :, None]
    sub -= (_half(b, 2) * mins.astype(np.float32))[:, :, None]


_Q6K_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _k_q6_k(b: np.ndarray, out: np.ndarray) -> None:
    # super-block of 256: 128 bytes of low 4 bits, 64 bytes of high 2 bits,
    # 16 int8 scales (one per 16 values), fp16 d; x = (d*scale) * (q - 32).
    # In each 128-value half, quarter k's value i takes the low (k < 2) or high
    # nibble of low byte i + 32*(k % 2), and bits 2k..2k+1 of high byte i.
    n = b.shape[0]
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    q = np.empty((n, 2, 4, 32), dtype=np.uint8)
    q[:, :, 0:2] = ql & 0x0F
    q[:, :, 2:4] = ql >> 4
    q |= ((qh >> _Q6K_SHIFTS) & 3) << 4
    out[:] = q.reshape(n, 256)
    out -= 32.0
    scale = _half(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
    out.reshape(n, 16, 16)[:] *= scale[:, :, None]


# type id -> kernel; the block sizes are in _BLOCK_SIZES.
_KERNELS: dict[int, Kernel] = {
    F32: _k_f32, F16: _k_f16, BF16: _k_bf16,
    Q8_0: _k_q8_0, Q4_0: _k_q4_0, Q4_1: _k_q4_1, Q4_K: _k_q4_k, Q6_K: _k_q6_k,
}
_INTEGER = {I8: "<i1", I16: "<i2", I32: "<i4", I64: "<i8"}
_SAME_BITS = {(F32, torch.float32), (F16, torch.float16), (BF16, torch.bfloat16)}


def _store_bf16(src: np.ndarray, dst: np.ndarray) -> None:
    """float32 -> bfloat16 bits, rounding to nearest even as torch does."""
    u = src.view(np.uint32)
    r = (u >> 16) & 1
    r += 0x7FFF
    r += u
    r >>= 16
    np.copyto(dst, r, casting="unsafe")
    nan = np.isnan(src)
    if nan.any():
        dst[nan] = 0x7FC0


def _store(src: np.ndarray, dst: np.ndarray) -> None:
    """Write float32 values into the destination's numpy view."""
    if dst.dtype == np.uint16:  # a bfloat16 tensor seen as its bits
        _store_bf16(src, dst)
    else:
        with np.errstate(over="ignore"):  # float16 overflows to inf, as in torch
            np.copyto(dst, src, casting="unsafe")


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a flat float tensor (bfloat16 as uint16 bits)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype not in (torch.float32, torch.float16, torch.float64):
        raise TypeError(f"cannot dequantize to {t.dtype}; use a floating dtype")
    return t.numpy()


_CHUNK_VALUES = 1 << 18   # values per task: temporaries stay in cache
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _parallel(task: Callable[[int, int], None], total: int, step: int) -> None:
    """Run ``task(start, stop)`` over [0, total) in steps, on the pool."""
    global _POOL
    if total <= step:
        task(0, total)
        return
    with _POOL_LOCK:  # loads may run on several I/O threads at once
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                       thread_name_prefix="tiergen-dequant")
    jobs = [_POOL.submit(task, i, min(i + step, total)) for i in range(0, total, step)]
    for job in jobs:
        job.result()


def dequantize(raw: np.ndarray, ggml_type: int, numel: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode ``raw`` (the uint8 bytes of ``numel`` values of ``ggml_type``)
    into a new flat tensor of ``dtype``. Results equal ``gguf.quants.dequantize``
    (then ``.to(dtype)``)."""
    out = torch.empty(numel, dtype=dtype)
    if numel == 0:
        return out
    if ggml_type in _INTEGER:
        return torch.from_numpy(raw.view(_INTEGER[ggml_type]).copy()).to(dtype)
    dst = _numpy_view(out)
    if (ggml_type, dtype) in _SAME_BITS:
        dst.view(np.uint8)[:] = raw  # stored as wanted: a plain copy
        return out
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        values = _dequantize_fallback(raw, ggml_type, numel)
        _parallel(lambda a, b: _store(values[a:b], dst[a:b]), numel, _CHUNK_VALUES)
        return out
    block, type_size = _BLOCK_SIZES[ggml_type]
    blocks = raw.reshape(-1, type_size)
    direct = dst.dtype == np.float32

    def task(a: int, b: int) -> None:
        target = dst[a * block:b * block].reshape(b - a, block)
        if direct:
            kernel(blocks[a:b], target)
        else:
            scratch = np.empty((b - a, block), dtype=np.float32)
            kernel(blocks[a:b], scratch)
            _store(scratch, target)

    _parallel(task, blocks.shape[0], max(1, _CHUNK_VALUES // block))
    return out


def _dequantize_fallback(raw: np.ndarray, ggml_type: int, numel: int) -> np.ndarray:
    """Types we have no kernel for: the gguf package's numpy decoder."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        values = gguf_dequantize(raw, GGMLQuantizationType(ggml_type))
    except (NotImplementedError, ValueError) as e:
        raise CheckpointError(f"cannot dequantize ggml type {ggml_type_name(ggml_type)}: {e}") from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(numel)
