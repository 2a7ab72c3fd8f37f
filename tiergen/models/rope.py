"""Rotary position embeddings (RoPE) and their context-extension variants.

Pure math, no device or offload logic. The numbers match Hugging Face
transformers (``modeling_rope_utils`` + ``LlamaRotaryEmbedding``) in fp32: the
frequencies are built with the same float32 operations in the same order,
because at positions in the 10^4..10^5 range a one-ulp difference in an inverse
frequency already moves the angle by more than 1e-5.

Public API:

* ``rope_frequencies(cfg, seq_len)`` -> (inv_freq [rotary_dim/2] fp32, attention scaling)
* ``rope_cos_sin(cfg, positions [B,T])`` -> (cos, sin), each [B, T, rotary_dim] fp32
* ``apply_rope(x [B,H,T,D], cos, sin)`` -> x rotated on its first rotary_dim dims

Sequence-length-dependent types (``dynamic``, ``longrope``) are evaluated per
batch row from that row's own largest position, so a sequence's embedding never
depends on which other sequences share its batch (HF instead uses the batch
maximum and keeps state across calls; see ``rope_cos_sin``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import torch

from .. import kernels
from ..config import ModelConfig

__all__ = ["rope_frequencies", "rope_cos_sin", "apply_rope", "apply_rope_into", "rotary_dim", "ROPE_TYPES"]


def _freeze(v: Any) -> Any:
    # longrope's short/long factors are lists; make them hashable for the cache key.
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass(frozen=True)
class _RopeSpec:
    """Everything the RoPE math reads from a config, in hashable form.

    A separate key rather than the ModelConfig itself: a config holding list
    values (longrope factors) is not hashable, and fields unrelated to RoPE
    (name, vocab, ...) should not split the cache.
    """
    rope_type: str
    theta: float
    head_dim: int
    max_position: int
    params: tuple[tuple[str, Any], ...]

    def get(self, key: str, default: Any = None) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        return default

    @property
    def dim(self) -> int:
        # HF: int(head_dim * partial_rotary_factor), the number of rotated dims.
        return int(self.head_dim * (self.get("partial_rotary_factor") or 1.0))

    @property
    def original_max(self) -> int:
        # HF's standardize_rope_params fills this in from max_position_embeddings
        # for llama3 / yarn / longrope when the checkpoint omits it.
        return int(self.get("original_max_position_embeddings") or self.max_position)


def _spec(cfg: ModelConfig) -> _RopeSpec:
    params = tuple(sorted((k, _freeze(v)) for k, v in cfg.rope_params.items()
                          if v is not None and k not in ("type", "rope_type", "rope_theta")))
    return _RopeSpec(cfg.rope_type, float(cfg.rope_theta), int(cfg.head_dim),
                     int(cfg.max_position), params)


def _base_inv_freq(base: float | torch.Tensor, dim: int, device: torch.device | None) -> torch.Tensor:
    """1 / base^(2i/dim) in float32, the op order HF uses (so results agree bit-wise)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    # A tensor base of shape [B,1] (per-row dynamic NTK) broadcasts to [B, dim/2].
    return 1.0 / (base ** exponent)


# --------------------------------------------------------------- rope types
# Each takes (spec, seq_len, device) and returns (inv_freq, attention_scaling).
# seq_len is None (init-time / fixed frequencies) or an int64 tensor: a 0-d
# tensor gives inv_freq [dim/2], a [B,1] tensor gives per-row [B, dim/2].

RopeFn = Callable[[_RopeSpec, "torch.Tensor | None", "torch.device | None"], tuple[torch.Tensor, float]]


def _default(spec: _RopeSpec, seq_len: torch.Tensor | None,
             device: torch.device | None) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(spec.theta, spec.dim, device), 1.0


def _linear(spec: _RopeSpec, seq_len: torch.Tensor | None,
            device: torch.device | None) -> tuple[torch.Tensor, float]:
    # Position interpolation: p/factor * w == p * (w/factor).
    return _base_inv_freq(spec.theta, spec.dim, device) / spec.get("factor", 1.0), 1.0


def _dynamic(spec: _RopeSpec, seq_len: torch.Tensor | None,
             device: torch.device | None) -> tuple[torch.Tensor, float]:
    dim, max_pos = spec.dim, spec.max_position
    factor = spec.get("factor", 1.0)
    fixed = _base_inv_freq(spec.theta, dim, device)
    if seq_len is None:
        # At or below the trained length NTK scaling is the identity.
        return fixed, 1.0
    # HF grows the base with the current length, computed in float32 tensors
    # (its runtime path passes seq_len as a tensor); mirror that exactly.
    seq = torch.clamp(seq_len.to(device=device, dtype=torch.int64), min=max_pos)
    base = spec.theta * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    scaled = _base_inv_freq(base, dim, device)
    # Rows at or under max_pos keep the unscaled frequencies, as HF does (it
    # only recomputes when the length exceeds max_position_embeddings).
    return torch.where(seq_len.to(device) > max_pos, scaled, fixed), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    # YaRN's attention temperature: 0.1*ln(s)+1, and no change when not stretched.
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(spec: _RopeSpec, seq_len: torch.Tensor | None,
          device: torch.device | None) -> tuple[torch.Tensor, float]:
    dim, base = spec.dim, spec.theta
    orig = spec.original_max
    factor = spec.get("factor")
    if factor is None:
        # DeepSeek-style configs give only the two lengths; their ratio is the stretch.
        factor = spec.max_position / orig
    attention = spec.get("attention_factor")
    if attention is None:
        mscale, mscale_all = spec.get("mscale"), spec.get("mscale_all_dim")
        if mscale and mscale_all:   # both must be truthy (HF), else plain formula
            attention = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all))
        else:
            attention = _yarn_mscale(factor)
    # `or` not a default: HF treats 0 / None as "use the paper's value" too.
    beta_fast = spec.get("beta_fast") or 32
    beta_slow = spec.get("beta_slow") or 1

    def dim_for_rotations(rotations: float) -> float:
        # Dimension index whose wavelength fits `rotations` turns in orig positions.
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_for_rotations(beta_fast), dim_for_rotations(beta_slow)
    if spec.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid 0/0 in the ramp

    wavelength_base = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    extrapolated = 1.0 / wavelength_base             # original frequencies
    interpolated = 1.0 / (factor * wavelength_base)  # linearly stretched ones
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp.to(device=device, dtype=torch.float)  # 1: high freq kept, 0: stretched
    return interpolated * (1 - keep) + extrapolated * keep, float(attention)


def _longrope(spec: _RopeSpec, seq_len: torch.Tensor | None,
              device: torch.device | None) -> tuple[torch.Tensor, float]:
    dim, orig = spec.dim, spec.original_max
    factor = spec.get("factor")
    if factor is None:
        factor = spec.max_position / orig   # Phi-3 style: ratio of the two lengths
    attention = spec.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    short = torch.tensor(spec.get("short_factor"), dtype=torch.float32, device=device)
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    powers = spec.theta ** shape
    if seq_len is None:
        return 1.0 / (short * powers), float(attention)
    # Per-row choice of the factor set: long beyond the pretraining length.
    long = torch.tensor(spec.get("long_factor"), dtype=torch.float32, device=device)
    ext = torch.where(seq_len.to(device) > orig, long, short)
    return 1.0 / (ext * powers), float(attention)


def _llama3(spec: _RopeSpec, seq_len: torch.Tensor | None,
            device: torch.device | None) -> tuple[torch.Tensor, float]:
    inv = _base_inv_freq(spec.theta, spec.dim, device)
    factor = spec.get("factor")
    low_ff, high_ff = spec.get("low_freq_factor"), spec.get("high_freq_factor")
    orig = spec.original_max
    low_wavelen, high_wavelen = orig / low_ff, orig / high_ff
    wavelen = 2 * math.pi / inv
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones
    # kept, and the band in between blended linearly in 1/wavelength.
    stretched = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * stretched / factor + smooth * stretched
    in_band = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(in_band, blended, stretched), 1.0


ROPE_TYPES: dict[str, RopeFn] = {
    "default": _default,
    "linear": _linear,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "llama3": _llama3,
    "longrope": _longrope,
}

# Types whose frequencies depend on the sequence length; evaluated per row.
_LENGTH_DEPENDENT = frozenset({"dynamic", "longrope"})


def _fn(spec: _RopeSpec) -> RopeFn:
    try:
        return ROPE_TYPES[spec.rope_type]
    except KeyError:
        raise ValueError(f"unsupported rope type {spec.rope_type!r}; "
                         f"supported: {', '.join(sorted(ROPE_TYPES))}") from None


def _frequencies(spec: _RopeSpec, seq_len: torch.Tensor | None,
                 device: torch.device | None) -> tuple[torch.Tensor, float]:
    """The type's frequencies, each divided by its ``freq_factors`` entry where the model has
    them (llama.cpp's rope_freqs tensor: how a GGUF carries llama3's scaling)."""
    inv, scale = _fn(spec)(spec, seq_len, device)
    factors = spec.get("freq_factors")
    if factors is not None:
        inv = inv / torch.tensor(factors, dtype=torch.float32, device=inv.device)
    return inv, scale


@lru_cache(maxsize=64)
def _fixed(spec: _RopeSpec, device: torch.device) -> tuple[torch.Tensor, float]:
    # One set per (config, device): a call then costs only the outer product.
    return _frequencies(spec, None, device)


# ------------------------------------------------------------------ public
def rotary_dim(cfg: ModelConfig) -> int:
    """Number of leading head dims that RoPE rotates (head_dim * partial_rotary_factor)."""
    return _spec(cfg).dim


def rope_frequencies(cfg: ModelConfig, seq_len: int | torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, [rotary_dim/2]) and the cos/sin scaling factor.

    ``seq_len`` matters only to ``dynamic`` (NTK base grows once seq_len exceeds
    ``max_position``) and ``longrope`` (long factors once seq_len exceeds the
    original length). A [B,1] int tensor gives per-row frequencies [B, rotary_dim/2].
    """
    spec = _spec(cfg)
    if seq_len is None or spec.rope_type not in _LENGTH_DEPENDENT:
        inv, scale = _fixed(spec, torch.device("cpu"))
        return inv.clone(), scale   # the cached tensor must not be mutated by callers
    if not isinstance(seq_len, torch.Tensor):
        seq_len = torch.tensor(int(seq_len), dtype=torch.int64)
    return _frequencies(spec, seq_len, seq_len.device)


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, rotary_dim] float32 for int64 ``positions`` [B, T].

    Layout is HF's: the per-frequency angles concatenated twice (rotate_half
    convention), already multiplied by the attention scaling factor.

    For ``dynamic`` / ``longrope`` each row uses its own length (max position + 1).
    HF's LlamaRotaryEmbedding instead uses the batch-wide max and is stateful:
    it keeps the frequencies of the longest length seen so far and resets only
    when a call's length drops back under max_position_embeddings. With batch
    size 1 and non-decreasing lengths (prefill then decode) the two agree.
    """
    spec = _spec(cfg)
    pos = positions.to(torch.float32)[..., None]                   # [B, T, 1]
    if spec.rope_type in _LENGTH_DEPENDENT:
        row_len = positions.amax(dim=-1, keepdim=True).to(torch.int64) + 1  # [B, 1]
        inv, scale = _frequencies(spec, row_len, positions.device)   # [B, rd/2]
        freqs = pos * inv[:, None, :]
    else:
        inv, scale = _fixed(spec, positions.device)
        freqs = pos * inv
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # (x1, x2) -> (-x2, x1): pairs dim i with dim i + d/2 (HF/NeoX convention).
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` [B, H, T, D]; the rest pass through.

    ``cos``/``sin`` are [B, T, rotary_dim] (from ``rope_cos_sin``). The product is
    taken in float32, so half-precision inputs are rotated accurately and then
    rounded once, back to x's dtype.
    """
    rd = cos.shape[-1]
    cos = cos[:, None].to(torch.float32)   # broadcast over heads
    sin = sin[:, None].to(torch.float32)
    rot = x[..., :rd].to(torch.float32)
    out = (rot * cos) + (_rotate_half(rot) * sin)
    out = out.to(x.dtype)
    if rd == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rd:]), dim=-1)


def apply_rope_into(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> None:
    """``apply_rope`` for token-major x [N, H, D], written into ``out`` (same shape).

    cos/sin are [N, 1, rotary_dim] rows of ``rope_cos_sin``. Its layout repeats
    the angles in both halves, so with x = (x1, x2) on the rotated dims
        out1 = x1*cos - x2*sin,   out2 = x2*cos + x1*sin
    and each half is two fused passes straight into ``out``, with none of
    rotate_half's temporaries. Half-precision x is rotated in float32 and
    rounded once, like ``apply_rope``.
    """
    rd = cos.shape[-1]
    float_angles = cos.dtype == sin.dtype == torch.float32 and cos.stride(-1) == sin.stride(-1) == 1
    fast = kernels.for_bf16("rowwise", x, out) if float_angles and x.dim() == 3 else None
    if fast is not None:
        fast.rope_into(x, cos, sin, out)   # the same arithmetic in one pass (tiergen/kernels/rowwise.cpp)
        return
    half = rd // 2
    c, s = cos[..., :half], sin[..., :half]
    exact = x.dtype == torch.float32 and out.dtype == torch.float32
    src = x if exact else x[..., :rd].float()
    dst = out if exact else torch.empty(src.shape[:-1] + (rd,), dtype=torch.float32, device=x.device)
    x1, x2 = src[..., :half], src[..., half:rd]
    o1, o2 = dst[..., :half], dst[..., half:rd]
    torch.mul(x1, c, out=o1)
    o1.addcmul_(x2, s, value=-1.0)
    torch.mul(x2, c, out=o2)
    o2.addcmul_(x1, s)
    if not exact:
        out[..., :rd] = dst
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]
