"""Group-wise asymmetric n-bit quantization for weights and the KV cache.

A tensor is cut into groups of ``group_size`` consecutive values along
``group_dim``; each group stores its minimum and a scale = (max - min) /
(2**bits - 1), and every value becomes the integer code round((x - min) / scale)
in [0, 2**bits - 1]. The codes are bit-packed inside their own group, so a
``QTensor`` stays sliceable along every dimension except ``group_dim`` (a KV
cache quantized along head_dim can be written one token at a time).

Storage layout (``outer`` = the input shape with ``group_dim`` removed):

- ``data``   uint8 ``[*outer, num_groups, group_bytes]``
- ``mins``   ``[*outer, num_groups]`` in ``scale_dtype``
- ``scales`` ``[*outer, num_groups]`` in ``scale_dtype``

Packing: widths that divide 8 (1, 2, 4, 8) put 8 // bits codes in a byte in
planes: a group of n codes (padded to a multiple of 8 // bits) is cut into
8 // bits runs of ``per`` codes, and byte j holds code j + per * i in bits
[bits * i, bits * (i + 1)): unpacking is then one shift/mask per plane
written as a contiguous run, with no interleaving pass. Other widths (3, 5, 6, 7) pack 8 codes densely
into ``bits`` bytes, little-endian (code i occupies bits [i*bits, (i+1)*bits)
of the 64-bit little-endian word formed by those bytes). A group whose length
is not a multiple of the chunk is padded with zero codes inside its last chunk.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in
                (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize one kind of tensor.

    ``scale_dtype`` None stores mins/scales in the input's dtype (float32 for
    float64 inputs): a constant group then round-trips exactly, and for a
    bf16/fp16 model this costs 4 bytes per group. float16 scales underflow for
    groups narrower than ~1e-3 and overflow past 65504; bfloat16 has float32's
    range (and costs about 2% more RMS error at 8 bits). ``rotate`` applies an
    orthonormal Walsh-Hadamard transform along ``group_dim`` before quantizing
    (and undoes it after dequantizing); it spreads outlier channels over the
    whole vector and needs that dimension to be a power of two.
    """
    bits: int = 4
    group_size: int = 64
    group_dim: int = -1
    scale_dtype: torch.dtype | None = None
    rotate: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer in [2, 8], got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        if not isinstance(self.group_dim, int):
            raise ValueError(f"group_dim must be an integer, got {self.group_dim!r}")
        if self.scale_dtype is not None and self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {SCALE_DTYPES} or None, got {self.scale_dtype}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1


# The weight default measured in benchmarks/quant_ppl_results.md: groups along the
# input (reduction) dim, the last dim of an [out, in] linear weight, beat groups along
# the output dim at every size; groups of 32 cost 0.5 bit more than 64 but are more
# accurate, and reproduce a Q4_1 GGUF checkpoint (the embedded model) exactly.
WEIGHT_QUANT = QuantConfig(bits=4, group_size=32, group_dim=-1)


@dataclass(frozen=True)
class KVQuantConfig:
    """How to quantize the KV cache (defaults measured in benchmarks/quant_ppl_results.md).

    Post-RoPE keys have a few channels far larger than the rest, so one min/scale
    per token and head cannot serve both: with ``per_channel_keys`` (KIVI-style)
    keys are grouped along tokens, ``group_size`` consecutive tokens per channel,
    and an engine keeps the newest ``len % group_size`` keys unquantized until their
    group is full. Values are always grouped per token along head_dim.
    """
    bits: int = 4
    group_size: int = 64
    per_channel_keys: bool = True
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        self.value(-1)  # validates bits, group size and scale dtype

    def key(self, token_dim: int, head_dim: int = -1) -> QuantConfig:
        """Config for keys laid out with tokens on ``token_dim`` and channels on ``head_dim``."""
        dim = token_dim if self.per_channel_keys else head_dim
        return QuantConfig(self.bits, self.group_size, dim, self.scale_dtype)

    def value(self, head_dim: int = -1) -> QuantConfig:
        return QuantConfig(self.bits, self.group_size, head_dim, self.scale_dtype)

    def unquantized_keys(self, num_tokens: int) -> int:
        """How many of the newest keys stay in the residual (16-bit) buffer."""
        return num_tokens % self.group_size if self.per_channel_keys else 0


def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing chunk."""
    return (8 // bits, 1) if 8 % bits == 0 else (8, bits)


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take once packed."""
    vals, nb = _chunk(bits)
    return -(-n // vals) * nb


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits along the last dim: [..., n] -> [..., packed_size(n, bits)]."""
    vals, nb = _chunk(bits)
    pad = (-codes.shape[-1]) % vals
    if pad:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], -1)
    if nb == 1:
        c = codes.reshape(*codes.shape[:-1], vals, -1)     # planes
        out = c[..., 0, :].clone()
        for i in range(1, vals):
            out |= c[..., i, :] << (bits * i)
        return out
    c = codes.reshape(*codes.shape[:-1], -1, vals)
    word = c[..., 0].to(torch.int64)
    for i in range(1, vals):
        word |= c[..., i].to(torch.int64) << (bits * i)
    out = torch.stack([(word >> (8 * j)) & 0xFF for j in range(nb)], -1).to(torch.uint8)
    return out.reshape(*codes.shape[:-1], -1)


def _planes(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of planar-packed bytes [..., per] -> [..., vals * per]; the first plane needs
    no shift and the last no mask."""
    vals, mask = 8 // bits, (1 << bits) - 1
    if vals == 1:
        return b
    fields = [b & mask] + [(b >> (bits * i)) & mask for i in range(1, vals - 1)] + [b >> (bits * (vals - 1))]
    return torch.cat(fields, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``pack``: [..., packed_size(n, bits)] uint8 -> [..., n] uint8 codes."""
    vals, nb = _chunk(bits)
    if nb == 1:
        return _planes(packed, bits)[..., :n]
    mask = (1 << bits) - 1
    p = packed.reshape(*packed.shape[:-1], -1, nb)
    word = p[..., 0].to(torch.int64)
    for j in range(1, nb):
        word |= p[..., j].to(torch.int64) << (8 * j)
    codes = torch.stack([(word >> (bits * i)) & mask for i in range(vals)], -1).to(torch.uint8)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]


def _storage_dtype(cfg: QuantConfig, dtype: torch.dtype) -> torch.dtype:
    if cfg.scale_dtype is not None:
        return cfg.scale_dtype
    return dtype if dtype in SCALE_DTYPES else torch.float32


def _norm_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"group_dim {dim} is out of range for a {ndim}-d tensor")
    return dim % ndim


def layout(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
           cfg: QuantConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of a QTensor's tensors, so an engine can size budgets or
    preallocate buffers (e.g. a compressed KV cache) without quantizing anything."""
    shape = tuple(shape) or (1,)
    gd = _norm_dim(cfg.group_dim, len(shape))
    outer = shape[:gd] + shape[gd + 1:]
    groups = -(-shape[gd] // cfg.group_size)
    sd = _storage_dtype(cfg, dtype)
    return {"data": (outer + (groups, packed_size(cfg.group_size, cfg.bits)), torch.uint8),
            "mins": (outer + (groups,), sd), "scales": (outer + (groups,), sd)}


def quantized_nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, cfg: QuantConfig) -> int:
    """Bytes a tensor of ``shape`` takes once quantized, scales and mins included."""
    return sum(math.prod(s) * d.itemsize for s, d in layout(shape, dtype, cfg).values())


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: three plain tensors plus what is needed to rebuild the original."""
    data: torch.Tensor
    mins: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    cfg: QuantConfig

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"data": self.data, "mins": self.mins, "scales": self.scales}

    def meta(self) -> dict[str, Any]:
        """JSON-friendly description; with ``tensors()`` it rebuilds the QTensor."""
        c = self.cfg
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "bits": c.bits, "group_size": c.group_size, "group_dim": c.group_dim,
                "scale_dtype": None if c.scale_dtype is None else str(c.scale_dtype).removeprefix("torch."),
                "rotate": c.rotate}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "QTensor":
        """Rebuild from ``tensors()`` and ``meta()``. Tensors may come back flat or as
        raw uint8 bytes (e.g. read from disk); they are viewed and reshaped as needed."""
        sd = meta.get("scale_dtype")
        cfg = QuantConfig(bits=meta["bits"], group_size=meta["group_size"], group_dim=meta["group_dim"],
                          scale_dtype=None if sd is None else _DTYPE_NAMES[sd],
                          rotate=bool(meta.get("rotate", False)))
        shape, dtype = torch.Size(meta["shape"]), _DTYPE_NAMES[meta["dtype"]]
        parts = {}
        for name, (s, d) in layout(shape, dtype, cfg).items():
            t = tensors[name]
            if t.dtype != d:
                t = t.contiguous().view(torch.uint8).view(d)  # raw bytes -> the stored dtype
            if t.numel() != math.prod(s):
                raise ValueError(f"{name}: expected {math.prod(s)} elements of {d}, got {t.numel()}")
            parts[name] = t.reshape(s)
        return cls(parts["data"], parts["mins"], parts["scales"], shape, dtype, cfg)

    def _map(self, fn: Any) -> "QTensor":
        return QTensor(fn(self.data), fn(self.mins), fn(self.scales), self.shape, self.dtype, self.cfg)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QTensor":
        """Move the compressed tensors; dequantize on the compute device."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "QTensor":
        return self._map(lambda t: t.pin_memory())


_HADAMARD: dict[tuple[int, torch.device], torch.Tensor] = {}


def _hadamard_matrix(n: int, device: torch.device) -> torch.Tensor:
    key = (n, device)
    if key not in _HADAMARD:
        h = torch.ones(1, 1, dtype=torch.float32)
        while h.shape[0] < n:  # Sylvester's construction: [[H, H], [H, -H]]
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _HADAMARD[key] = (h / math.sqrt(n)).to(device)
    return _HADAMARD[key]


def hadamard(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Normalized Walsh-Hadamard transform along ``dim`` (a power of two), in float32.

    The matrix is symmetric and orthonormal, so applying it twice is the identity
    and (H q) . (H k) = q . k: rotating queries and keys leaves attention scores
    unchanged, and rotating values is undone by rotating the attention output.
    """
    n = x.shape[dim]
    if n & (n - 1):
        raise ValueError(f"hadamard needs a power-of-two size, got {n}")
    y = x.movedim(dim, -1).float() @ _hadamard_matrix(n, x.device)
    return y.movedim(-1, dim)


def _round_toward(v: torch.Tensor, dtype: torch.dtype, down: bool) -> torch.Tensor:
    """float32 ``v`` rounded to ``dtype`` toward -inf (``down``) or +inf, so the
    stored min never exceeds the group's minimum and the stored scale never
    undershoots the range: the half-step error bound then holds for stored values."""
    t = v.to(dtype)
    if dtype == torch.float32:
        return t
    wrong = t.float() > v if down else t.float() < v
    # Step one ulp through the bit pattern; a zero takes the sign that makes
    # the step land on the smallest subnormal of the right sign.
    t0 = torch.where(t == 0, torch.full_like(t, -0.0 if down else 0.0), t)
    bits = t0.view(torch.int16)
    neg = bits < 0
    step = torch.where(neg, 1, -1) if down else torch.where(neg, -1, 1)
    stepped = (bits + step.to(torch.int16)).view(dtype)
    return torch.where(wrong, stepped, t)


def quantize(x: torch.Tensor, cfg: QuantConfig = QuantConfig()) -> QTensor:
    """Group-wise asymmetric quantization of a floating-point tensor (computed in float32)."""
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating-point tensor, got {x.dtype}")
    shape, dtype = x.shape, x.dtype
    xs = x.reshape(1) if x.dim() == 0 else x
    gd = _norm_dim(cfg.group_dim, xs.dim())
    xm = xs.movedim(gd, -1).float()
    if cfg.rotate:
        xm = hadamard(xm, -1)
    n, g = xm.shape[-1], cfg.group_size
    groups = -(-n // g)
    pad = groups * g - n
    if pad:  # repeat the last real value: the padded group's min/max stay those of its real values
        xm = torch.cat([xm, xm[..., -1:].expand(*xm.shape[:-1], pad)], -1)
    xg = xm.reshape(*xm.shape[:-1], groups, g)
    sd = _storage_dtype(cfg, dtype)
    mins = _round_toward(xg.amin(-1), sd, down=True)
    lo = mins.float()
    scales = _round_toward((xg.amax(-1) - lo) / cfg.levels, sd, down=False)
    s = scales.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # constant group: x - min == 0, code 0
    codes = ((xg - lo[..., None]) / safe[..., None]).round_().clamp_(0, cfg.levels).to(torch.uint8)
    return QTensor(pack(codes, cfg.bits), mins, scales, shape, dtype, cfg)


def _dequantize_planar(data: torch.Tensor, mins: torch.Tensor, scales: torch.Tensor, bits: int,
                       out: torch.dtype) -> torch.Tensor:
    """min + code * scale for planar-packed groups, in float32, rounded once to ``out``."""
    codes = _planes(data, bits)
    return torch.addcmul(mins[..., None].float(), codes.float(), scales[..., None].float()).to(out)


class _Kernel:
    """``_dequantize_planar`` through torch.compile: the unpack, scale and cast fuse into
    one pass over memory, 5-8x faster than eager on a CPU, which decides whether
    compressed weights pay off at all. Falls back to eager (for good) if compiling
    fails, e.g. on a machine without a C++ compiler; TIERGEN_COMPILE=0 disables it."""

    def __init__(self) -> None:
        self.compiled: Any = None
        self.enabled = os.environ.get("TIERGEN_COMPILE", "1") != "0"

    def __call__(self, *args: Any) -> torch.Tensor:
        if self.enabled:
            try:
                if self.compiled is None:
                    import torch._inductor.config as inductor
                    inductor.compile_threads = 1   # no pool of compiler processes: they cost RAM, not time here
                    self.compiled = torch.compile(_dequantize_planar, dynamic=True)
                return self.compiled(*args)
            except Exception:   # noqa: BLE001 -- any compiler failure: stay correct, run eager
                self.enabled = False
        return _dequantize_planar(*args)


_kernel = _Kernel()


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Back to a dense tensor of ``dtype`` (default: the original dtype), on q's device."""
    cfg = q.cfg
    out = dtype or q.dtype
    shape = tuple(q.shape) or (1,)
    gd = _norm_dim(cfg.group_dim, len(shape))
    if 8 % cfg.bits == 0 and not cfg.rotate:
        x = _kernel(q.data, q.mins, q.scales, cfg.bits, out)[..., :cfg.group_size]
    else:
        codes = unpack(q.data, cfg.bits, cfg.group_size).float()
        x = torch.addcmul(q.mins.float()[..., None], codes, q.scales.float()[..., None])
    x = x.reshape(*x.shape[:-2], -1)[..., :shape[gd]]
    if cfg.rotate:
        x = hadamard(x, -1)
    x = x.movedim(-1, gd).to(out)
    return x.contiguous().reshape(q.shape)


def dequantize_into(q: QTensor, out: torch.Tensor, chunk_bytes: int = 4 << 20) -> torch.Tensor:
    """``dequantize(q)`` written into ``out`` (q's shape, out's dtype). With groups along the
    last dim it goes a few rows at a time, so its temporaries stay small enough for the
    allocator to reuse instead of faulting in fresh pages for a whole tensor."""
    shape = tuple(q.shape)
    if len(shape) < 2 or _norm_dim(q.cfg.group_dim, len(shape)) != len(shape) - 1:
        return out.copy_(dequantize(q, out.dtype))
    rows = max(1, chunk_bytes // (math.prod(shape[1:]) * out.element_size()))
    for r in range(0, shape[0], rows):
        n = min(rows, shape[0] - r)
        part = QTensor(q.data[r:r + n], q.mins[r:r + n], q.scales[r:r + n], torch.Size((n,) + shape[1:]),
                       q.dtype, q.cfg)
        out[r:r + n].copy_(dequantize(part, out.dtype))
    return out


# ---------------------------------------------------------------- blobs
# A QTensor as one flat uint8 tensor: data, mins and scales at 64-byte aligned
# offsets. Tiers store and move a blob like any other tensor (one copy, one disk
# range); the compute side views it back as a QTensor without copying.
_BLOB_ALIGN = 64


def _blob_parts(shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                cfg: QuantConfig) -> list[tuple[str, int, tuple[int, ...], torch.dtype]]:
    parts, off = [], 0
    for name, (s, d) in layout(shape, dtype, cfg).items():
        parts.append((name, off, s, d))
        off += -(-math.prod(s) * d.itemsize // _BLOB_ALIGN) * _BLOB_ALIGN
    return parts


def blob_nbytes(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, cfg: QuantConfig) -> int:
    name, off, s, d = _blob_parts(shape, dtype, cfg)[-1]
    return off + math.prod(s) * d.itemsize


def to_blob(q: QTensor) -> torch.Tensor:
    out = torch.zeros(blob_nbytes(q.shape, q.dtype, q.cfg), dtype=torch.uint8, device=q.device)
    for name, off, s, d in _blob_parts(q.shape, q.dtype, q.cfg):
        t = getattr(q, name).contiguous().view(-1).view(torch.uint8)
        out[off:off + t.numel()] = t
    return out


def from_blob(blob: torch.Tensor, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
              cfg: QuantConfig) -> QTensor:
    """View a blob (on any device) as the QTensor it holds; no copy."""
    parts = {}
    for name, off, s, d in _blob_parts(shape, dtype, cfg):
        parts[name] = blob[off:off + math.prod(s) * d.itemsize].view(d).view(s)
    return QTensor(parts["data"], parts["mins"], parts["scales"], torch.Size(shape), dtype, cfg)
