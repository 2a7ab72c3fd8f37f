"""A GGUF reader of our own: header, metadata and tensor index parsed with
``struct``, tensor bytes memory-mapped, common ggml block formats dequantized
with vectorized numpy kernels, and a streaming view under Hugging Face names.

Why not ``gguf.GGUFReader``: it builds one numpy view per vocabulary string,
which costs seconds on a 49k-token vocab; a tight struct loop takes tens of ms,
and model load time is a budget we keep.

File layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64
tensor count, u64 metadata count, the metadata key/values, the tensor infos
(name, dims fastest-first, type, offset), padding to ``general.alignment``,
then the tensor data.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, ModelNotFoundError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

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

# Metadata value types (gguf spec).
_STRING, _ARRAY = 8, 9
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_SCALAR = {t: struct.Struct(f) for t, f in _SCALAR_FMT.items()}
_NUMPY_OF = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1",
             10: "<u8", 11: "<i8", 12: "<f8"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and what it is."""

    name: str
    shape: tuple[int, ...]   # torch / HF order: GGUF dims reversed
    ggml_type: int
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


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
class _Truncated(Exception):
    """Raised inside the parser when a read runs past the end of the file."""


class _Parser:
    """A cursor over the mapped file; every read is bounds-checked."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def unpack(self, st: struct.Struct) -> Any:
        if self.pos + st.size > self.size:
            raise _Truncated
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self) -> str:
        n = self.unpack(_U64)
        end = self.pos + n
        if end > self.size:
            raise _Truncated
        s = self.buf[self.pos:end].decode("utf-8", "replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        st = _SCALAR.get(vtype)
        if st is not None:
            return self.unpack(st)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack(_U32)
            count = self.unpack(_U64)
            return self.array(etype, count)
        raise CheckpointError(f"unknown metadata value type {vtype}")

    def array(self, etype: int, count: int) -> list[Any]:
        left = self.size - self.pos
        if etype in _NUMPY_OF:
            nbytes = count * _SCALAR[etype].size
            if nbytes > left:
                raise _Truncated
            # numpy turns a whole numeric array into python values in one go.
            arr = np.frombuffer(self.buf, dtype=_NUMPY_OF[etype], count=count, offset=self.pos)
            self.pos += nbytes
            return (arr != 0).tolist() if etype == 7 else arr.tolist()
        if etype == _STRING:
            if count * 8 > left:
                raise _Truncated
            return self.strings(count)
        if etype == _ARRAY:
            if count * 12 > left:
                raise _Truncated
            return [self.value(_ARRAY) for _ in range(count)]
        raise CheckpointError(f"unknown metadata array element type {etype}")

    def strings(self, count: int) -> list[str]:
        # The hot loop of the whole reader (vocab and merges): locals only.
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                raise _Truncated
            n = unpack(buf, pos)[0]
            pos += 8
            end = pos + n
            if end > size:
                raise _Truncated
            out[i] = buf[pos:end].decode("utf-8", "replace")
            pos = end
        self.pos = pos
        return out


# ------------------------------------------------------------------ the file
class GGUFFile:
    """One GGUF file: ``metadata`` (key -> python value), ``tensors``
    (name -> TensorInfo, in file order), and tensor data on demand.

    The file stays memory-mapped (copy-on-write, never written) until
    ``close()``; ``raw()`` views into it without copying."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        if not os.path.exists(self.path):
            raise ModelNotFoundError(f"{self.path}: no such GGUF file")
        if os.path.isdir(self.path):
            raise ModelNotFoundError(f"{self.path}: is a directory, not a GGUF file")
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < _HEADER.size:
                raise CheckpointError(f"{self.path}: header cut short ({size} bytes); truncated file?")
            # ACCESS_COPY: a writable private mapping, so numpy/torch views need
            # no read-only workarounds; nothing ever writes to it.
            self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        try:
            self._parse()
        except _Truncated:
            self.close()
            raise CheckpointError(f"{self.path}: header cut short; truncated file?") from None
        except CheckpointError as e:
            self.close()
            msg = str(e)
            raise CheckpointError(msg if msg.startswith(self.path) else f"{self.path}: {msg}") from None

    # ------------------------------------------------------------- parsing
    def _parse(self) -> None:
        p = _Parser(self._mm, self.size)
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(self._mm, 0)
        p.pos = _HEADER.size
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        if version & 0xFFFF == 0 and version:
            raise CheckpointError("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        if n_kv > self.size or n_tensors > self.size:
            raise _Truncated
        meta = self.metadata
        for _ in range(n_kv):
            key = p.string()
            meta[key] = p.value(p.unpack(_U32))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"general.alignment {align!r} is not a power of two")
        self.alignment = align

        raw_infos = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.unpack(_U32)
            if n_dims > 8:
                raise CheckpointError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [p.unpack(_U64) for _ in range(n_dims)]
            raw_infos.append((name, dims, p.unpack(_U32), p.unpack(_U64)))
        self.data_offset = -(-p.pos // align) * align

        for name, dims, ttype, rel in raw_infos:
            self.tensors[name] = self._tensor_info(name, dims, ttype, rel)

    def _tensor_info(self, name: str, dims: list[int], ttype: int, rel: int) -> TensorInfo:
        if name in self.tensors:
            raise CheckpointError(f"duplicate tensor {name!r}")
        sizes = _block_sizes(ttype)
        if sizes is None:
            raise CheckpointError(f"tensor {name!r} has unknown ggml type {ttype}")
        block, type_size = sizes
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise CheckpointError(
                f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                f"{ggml_type_name(ttype)} block size {block}")
        nbytes = numel // block * type_size
        start = self.data_offset + rel
        if start + nbytes > self.size:
            raise CheckpointError(
                f"tensor {name!r} data ends at byte {start + nbytes} but the file has "
                f"{self.size}; truncated file?")
        return TensorInfo(name, tuple(reversed(dims)), ttype, start, nbytes)

    # --------------------------------------------------------------- access
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 array viewing the mapped file (no copy)."""
        info = self._info(name)
        return self._view()[info.offset:info.offset + info.nbytes]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to ``dtype``, in torch/HF shape; a fresh tensor."""
        info = self._info(name)
        flat = dequantize(self.raw(name), info.ggml_type, info.numel, dtype)
        return flat.reshape(info.shape)

    def close(self) -> None:
        """Unmap the file; views handed out by ``raw()`` keep it alive until freed."""
        self._bytes = None  # type: ignore[assignment]
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported views still exist; the map goes when they do

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _view(self) -> np.ndarray:
        if self._bytes is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._bytes


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


# --------------------------------------------------- Hugging Face names/layout
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Tensors with no HF counterpart: llama3 rope factors are computed from config.
_IGNORED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp's converter interleaves q/k rows for these archs (its rotary
# layout); qwen2 keeps HF order. Mistral converts as arch "llama".
_PERMUTED_ARCHS = {"llama", "mistral"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama-style name for a GGUF tensor name, or None."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_PARTS:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"


def _head_count(meta: dict[str, Any], key: str, layer: int, default: Any = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise CheckpointError(f"GGUF metadata lacks {key}")
    return int(v[layer] if isinstance(v, list) else v)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head the GGUF rows go
    (pair 0 of half A, pair 0 of half B, ...); HF wants half A then half B."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot split {rows} rows into {n_heads} rotary heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_hf_tensors(f: GGUFFile, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one tensor at a time, in file order, under
    Hugging Face Llama names and layout; ``lm_head.weight`` only when the file
    has ``output.weight`` (else the embedding is tied)."""
    meta = f.metadata
    arch = meta.get("general.architecture", "")
    permute = arch in _PERMUTED_ARCHS
    for name in f.tensors:
        target = hf_name(name)
        if target is None:
            if name in _IGNORED:
                continue
            raise CheckpointError(f"{f.path}: tensor {name!r} has no Hugging Face counterpart")
        t = f.load(name, dtype)
        if permute and (".attn_q." in name or ".attn_k." in name):
            layer = int(name.split(".")[1])
            heads = _head_count(meta, f"{arch}.attention.head_count", layer)
            if ".attn_k." in name:
                heads = _head_count(meta, f"{arch}.attention.head_count_kv", layer, heads)
            t = unpermute_rows(t, heads)
        yield target, t
