"""How one layer's KV rows are stored: plain or group-wise quantized.

A codec knows the layout of a set of cache rows and nothing of tiers: the
KV cache gives it a *store* (a dict of tensors, on any device) and the codec
writes new tokens into it and reads a prefix back as dense token-major keys
and values [S, n, Hkv, D]. Every field of a store has a leading "unit" axis
(tokens, or blocks of tokens), so a prefix of the cache is a prefix of each
field: one contiguous copy or disk read per field, whatever the tier.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch

from .quant import KVQuantConfig, QTensor, dequantize, layout, quantize

Store = dict[str, torch.Tensor]
Fields = dict[str, tuple[tuple[int, ...], torch.dtype]]


class Codec(Protocol):
    def fields(self) -> Fields: ...
    def read_units(self, name: str, tokens: int) -> int: ...
    def alloc_units(self, name: str, tokens: int) -> int: ...
    def write(self, store: Store, start: int, k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[int, int]]: ...
    def read(self, store: Store, end: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def unit_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape[1:]) * dtype.itemsize


def nbytes(codec: Codec) -> int:
    return sum(s[0] * unit_bytes(s, d) for s, d in codec.fields().values())


def empty_store(codec: Codec, tokens: int | None = None, **kw: object) -> Store:
    """Fresh tensors for every field, with room for ``tokens`` (default: all)."""
    out = {}
    for name, (shape, dtype) in codec.fields().items():
        n = shape[0] if tokens is None else codec.alloc_units(name, tokens)
        out[name] = torch.empty((n,) + shape[1:], dtype=dtype, **kw)  # type: ignore[arg-type]
    return out


class DenseCodec:
    """Plain token-major rows: fields k and v, [max_len, n, Hkv, D]."""

    def __init__(self, n: int, heads: int, head_dim: int, max_len: int, dtype: torch.dtype):
        self.shape, self.dtype = (max_len, n, heads, head_dim), dtype

    def fields(self) -> Fields:
        return {"k": (self.shape, self.dtype), "v": (self.shape, self.dtype)}

    def read_units(self, name: str, tokens: int) -> int:
        return tokens

    alloc_units = read_units

    def write(self, store: Store, start: int, k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[int, int]]:
        end = start + k.shape[0]
        store["k"][start:end], store["v"][start:end] = k, v
        return {"k": (start, end), "v": (start, end)}

    def read(self, store: Store, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return store["k"][:end], store["v"][:end]


class QuantCodec:
    """Group-wise n-bit rows (``quant.quantize``, the same quantizer as the weights).

    Values, and keys unless ``per_channel_keys``, are grouped per token along
    head_dim: fields ``v.data/v.mins/v.scales`` with one unit per token. With
    ``per_channel_keys`` (KIVI), keys are grouped per channel over ``G`` =
    group_size consecutive tokens: a block is quantized when its last token
    arrives (fields ``k.*``, one unit per block) and the newest ``len % G`` keys
    wait in a dense residual ``kres`` [G, n, Hkv, D].
    """

    def __init__(self, cfg: KVQuantConfig, n: int, heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype):
        self.cfg, self.dtype = cfg, dtype
        self.row = (n, heads, head_dim)
        self.G = cfg.group_size
        self.vcfg = cfg.value(-1)
        self.kcfg = cfg.key(0) if cfg.per_channel_keys else cfg.value(-1)
        self.max_len = max_len
        self.blocks = max_len // self.G

    def _token_fields(self, pre: str) -> Fields:
        lay = layout((1,) + self.row, self.dtype, self.vcfg)
        return {f"{pre}.{k}": ((self.max_len,) + s[1:], d) for k, (s, d) in lay.items()}

    def fields(self) -> Fields:
        f = self._token_fields("v")
        if not self.cfg.per_channel_keys:
            return {**self._token_fields("k"), **f}
        lay = layout((self.G,) + self.row, self.dtype, self.kcfg)   # [n,H,D,1,pb], [n,H,D,1]
        f.update({f"k.{k}": ((self.blocks,) + self.row + s[4:], d) for k, (s, d) in lay.items()})
        f["kres"] = ((self.G,) + self.row, self.dtype)
        return f

    def read_units(self, name: str, tokens: int) -> int:
        if name.startswith("v.") or not self.cfg.per_channel_keys:
            return tokens
        return tokens % self.G if name == "kres" else tokens // self.G

    def alloc_units(self, name: str, tokens: int) -> int:
        return self.G if name == "kres" else self.read_units(name, tokens)

    # ---------------------------------------------------------------- tokens
    def _put_tokens(self, store: Store, pre: str, start: int, x: torch.Tensor) -> None:
        q = quantize(x, self.vcfg)
        end = start + x.shape[0]
        for k, t in q.tensors().items():
            store[f"{pre}.{k}"][start:end] = t

    def _get_tokens(self, store: Store, pre: str, end: int) -> torch.Tensor:
        q = QTensor(store[f"{pre}.data"][:end], store[f"{pre}.mins"][:end], store[f"{pre}.scales"][:end],
                    torch.Size((end,) + self.row), self.dtype, self.vcfg)
        return dequantize(q)

    # ---------------------------------------------------------------- api
    def write(self, store: Store, start: int, k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[int, int]]:
        # quantize the values as stored, so every tier and the residual agree
        k, v = k.to(self.dtype), v.to(self.dtype)
        end = start + k.shape[0]
        self._put_tokens(store, "v", start, v)
        changed = {name: (start, end) for name in ("v.data", "v.mins", "v.scales")}
        if not self.cfg.per_channel_keys:
            self._put_tokens(store, "k", start, k)
            changed.update({name: (start, end) for name in ("k.data", "k.mins", "k.scales")})
            return changed
        b0, r = divmod(start, self.G)
        keys = torch.cat([store["kres"][:r], k]) if r else k      # tokens [b0*G, end)
        full = keys.shape[0] // self.G
        if full:
            q = quantize(keys[:full * self.G], self.kcfg)           # data [n,H,D,full,pb]
            store["k.data"][b0:b0 + full] = q.data.movedim(-2, 0)
            store["k.mins"][b0:b0 + full] = q.mins.movedim(-1, 0)
            store["k.scales"][b0:b0 + full] = q.scales.movedim(-1, 0)
            changed.update({name: (b0, b0 + full) for name in ("k.data", "k.mins", "k.scales")})
        rest = keys[full * self.G:]
        store["kres"][:rest.shape[0]] = rest
        changed["kres"] = (0, rest.shape[0])
        return changed

    def read(self, store: Store, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        v = self._get_tokens(store, "v", end)
        if not self.cfg.per_channel_keys:
            return self._get_tokens(store, "k", end), v
        nb = end // self.G
        parts = []
        if nb:
            q = QTensor(store["k.data"][:nb].movedim(0, -2), store["k.mins"][:nb].movedim(0, -1),
                        store["k.scales"][:nb].movedim(0, -1), torch.Size((nb * self.G,) + self.row),
                        self.dtype, self.kcfg)
            parts.append(dequantize(q))
        if end > nb * self.G:
            parts.append(store["kres"][:end - nb * self.G])
        return (torch.cat(parts) if len(parts) > 1 else parts[0]), v


def make_codec(quant: KVQuantConfig | None, n: int, heads: int, head_dim: int, max_len: int,
               dtype: torch.dtype) -> Codec:
    if quant is None:
        return DenseCodec(n, heads, head_dim, max_len, dtype)
    return QuantCodec(quant, n, heads, head_dim, max_len, dtype)
