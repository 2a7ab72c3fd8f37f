"""The KV cache of one micro-batch, split over tiers by whole sequences.

The model only calls ``cache.layer(j).attend(q, k, v, ctx)``; which rows live
where, what gets prefetched, and where attention runs is decided here.

Layouts: compute-resident rows are head-major [n, Hkv, S, D] (what attention
wants); host and disk rows are token-major [S, n, Hkv, D], so appending a token
and reading a prefix are each one contiguous transfer.
"""
from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from . import host_heap
from .config import ModelConfig
from .models.attention import attention
from .models.base import StepContext
from .kv_codec import Codec, Store, empty_store, make_codec, nbytes as codec_nbytes, unit_bytes
from .policy import split_rows
from .quant import KVQuantConfig


@dataclass
class Runtime:
    """What placement code needs from the engine: devices, budgets, movers, I/O."""
    device: torch.device
    dtype: torch.dtype
    tiers: Any            # tiers.Tiers
    mover: Any            # transfer.Mover
    io: Any               # disk.IOPool
    offload: Any = None   # disk.OffloadDir | None
    cpu_attention: bool = False
    # KV cache home bytes of the live blocks per tier, their peak, and the peak's
    # uncompressed size (what memory_report shows)
    kv_current: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("gpu", "cpu", "disk"), 0))
    kv_peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("gpu", "cpu", "disk"), 0))
    kv_dense_peak: int = 0
    kv_dense_current: int = 0
    cast_scratch: "CastScratch" = field(default_factory=lambda: CastScratch())
    kept: "KeptBuffers" = field(default_factory=lambda: KeptBuffers())

    def kv_add(self, homes: dict[str, int], dense: int) -> None:
        for t, n in homes.items():
            self.kv_current[t] += n
        self.kv_dense_current += dense
        if sum(self.kv_current.values()) > sum(self.kv_peak.values()):
            self.kv_peak, self.kv_dense_peak = dict(self.kv_current), self.kv_dense_current

    @property
    def host_compute(self) -> bool:
        """No GPU: host memory is the compute memory."""
        return self.device.type != "cuda"


class CastScratch:
    """Reused buffers that a cache stored narrower than the compute dtype is cast into for
    attention, one per field and dtype: on the host, a fresh buffer per layer and
    micro-batch would fault its pages in every time (that cost 4x the copy itself)."""

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def cast(self, t: torch.Tensor, dtype: torch.dtype, dim: int, capacity: int, slot: str) -> torch.Tensor:
        """``t`` at ``dtype``; on the host, in the ``slot`` buffer, which is grown (to room for
        ``capacity`` along ``dim``) only when ``t`` does not fit, so a cache that gains a
        token per step, or blocks of other widths, reuse it instead of adding buffers."""
        if t.dtype == dtype:
            return t
        if t.device.type != "cpu":
            return t.to(dtype)       # a GPU's caching allocator already reuses memory
        buf = self.bufs.get((slot, dtype))
        if buf is None or buf.numel() < t.numel():
            room = t.numel() // max(1, t.shape[dim]) * max(capacity, t.shape[dim])
            buf = self.bufs[(slot, dtype)] = torch.empty(room, dtype=dtype)
        return buf[:t.numel()].view(t.shape).copy_(t)


Key = tuple[tuple[int, ...], torch.dtype, torch.device]


class KeptBuffers:
    """Head-major cache buffers of closed caches, kept for the next cache of the same shape.

    On the host a fresh buffer costs more than its use: faulting in SmolLM2's 755 MB
    cache at 256 x 128 took 0.6 s of a 9 s run (a VM backs new pages slowly). Kept
    buffers stay charged to their tier; a cache of another shape drops them all before
    it charges its own, so no pass ever holds more than it did without them.
    """

    def __init__(self) -> None:
        self.bufs: list[tuple[Key, str, torch.Tensor]] = []

    def keep(self, tiers: Any, tier: str, t: torch.Tensor) -> None:
        tiers[tier].alloc(t.nbytes, "KV cache kept for reuse")
        self.bufs.append(((tuple(t.shape), t.dtype, t.device), tier, t))

    def claim(self, tiers: Any, key: Key, count: int) -> list[torch.Tensor]:
        """Up to ``count`` kept buffers of ``key``; drops every buffer of another key."""
        taken, left = [], []
        for k, tier, t in self.bufs:
            if k == key and len(taken) < count:
                taken.append(t)
            elif k == key:
                left.append((k, tier, t))
                continue
            tiers[tier].free(t.nbytes)
        self.bufs = left
        return taken

    def drop(self, tiers: Any) -> None:
        for _, tier, t in self.bufs:
            tiers[tier].free(t.nbytes)
        self.bufs = []


@dataclass
class Part:
    tier: str
    rows: slice
    codec: Codec
    k: torch.Tensor | None = None    # dense compute rows, head-major [n,Hkv,S,D]
    v: torch.Tensor | None = None
    home: Store | None = None        # every other resident part: the codec's fields
    offsets: dict[str, int] | None = None   # disk: each field's byte offset in this layer's region
    # per-step working state
    work: Store | None = None
    work_bytes: int = 0
    work_tier: str = ""
    work_event: Any = None           # CUDA event: the prefetched copy has landed
    on_host: bool = True             # disk rows: attend on the CPU (vs copy to the GPU)
    pending: Future | None = None    # disk rows: the prefix read
    store: Future | None = None      # disk rows: the last token's write
    file_read: Any = None            # disk rows: (offset, tensor) -> None
    file_write: Any = None

    @property
    def head_major(self) -> bool:
        return self.k is not None


def _codec(cfg: ModelConfig, n: int, max_len: int, dtype: torch.dtype, quant: KVQuantConfig | None) -> Codec:
    return make_codec(quant, n, cfg.num_kv_heads, cfg.head_dim, max_len, dtype)


def _disk_layout(codec: Codec) -> tuple[dict[str, int], int]:
    """Field offsets inside one layer's disk region (4 KiB aligned) and the region's size."""
    offsets, off = {}, 0
    for name, (shape, dtype) in codec.fields().items():
        offsets[name] = off
        off += -(-shape[0] * unit_bytes(shape, dtype) // 4096) * 4096
    return offsets, off


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                shares: tuple[float, float, float], quant: KVQuantConfig | None = None) -> dict[str, int]:
    """Home bytes per tier for one micro-batch's cache over all layers."""
    out = {}
    for tier, n in zip(("gpu", "cpu", "disk"), split_rows(batch, shares)):
        codec = _codec(cfg, n, max_len, dtype, quant)
        per_layer = _disk_layout(codec)[1] if tier == "disk" else codec_nbytes(codec)
        out[tier] = cfg.num_layers * per_layer if n else 0
    return out


class LayerCache:
    def __init__(self, owner: "KVCache", j: int):
        self.owner, self.j = owner, j

    # ---------------------------------------------------------------- loads
    def prefetch(self, start: int, num_new: int) -> None:
        """Begin bringing the first ``start`` cached tokens of host/disk rows to where
        attention will run, into buffers with room for ``num_new`` more."""
        o = self.owner
        for p in o.parts[self.j]:
            if p.tier == "gpu" or p.work is not None or p.pending is not None:
                continue
            if p.tier == "cpu" and self._host_attn(num_new):
                continue   # attention reads the host rows in place
            end = start + num_new
            if p.tier == "cpu":   # CUDA: copy the prefix on the load stream
                mover = o.rt.mover
                with torch.cuda.stream(mover.load_stream):
                    work = empty_store(p.codec, end, device=o.rt.device)
                    moved = _copy_prefix(p.codec, p.home, work, start)
                    p.work_event = torch.cuda.Event()
                    p.work_event.record(mover.load_stream)
                for t in work.values():
                    t.record_stream(torch.cuda.current_stream(o.rt.device))
                o.rt.tiers.links.add("cpu->gpu", moved)
                self._charge(p, "gpu", _store_nbytes(work))
                p.work = work
                continue
            # disk: one contiguous read per field into host buffers
            if p.store is not None:
                p.store.result()     # the previous token's write must land first
                p.store = None
            host = empty_store(p.codec, end, pin_memory=o.rt.mover.cuda)
            self._charge(p, "gpu" if o.rt.host_compute else "cpu", _store_nbytes(host))
            base = o.layer_offset(self.j)

            def read(p: Part = p, host: Store = host) -> Store:
                n = 0
                for name, t in host.items():
                    u = p.codec.read_units(name, start)
                    if u:
                        p.file_read(base + p.offsets[name], t[:u])
                        n += t[:u].nbytes
                o.rt.tiers.links.add("disk->cpu" if o.rt.mover.cuda else "disk->gpu", n)
                return host
            p.pending = o.rt.io.submit(read)
            p.on_host = self._host_attn(num_new)

    def _host_attn(self, num_new: int) -> bool:
        """Attention over host-resident rows runs on the host: always without a GPU,
        and for decode steps with cpu_attention."""
        rt = self.owner.rt
        return rt.host_compute or (rt.cpu_attention and num_new == 1)

    def _charge(self, p: Part, tier: str, n: int) -> None:
        self.owner.rt.tiers[tier].alloc(n, "KV cache working buffer")
        p.work_bytes, p.work_tier = p.work_bytes + n, tier

    def _release(self, p: Part) -> None:
        if p.work_bytes:
            self.owner.rt.tiers[p.work_tier].free(p.work_bytes)
        p.work, p.work_bytes, p.pending, p.work_event = None, 0, None, None

    # ---------------------------------------------------------------- attend
    def new_rows(self, start: int, num_new: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step's column of the dense compute rows, token-major [B, Hkv, D], where
        they hold every row: the model's keys and values land there, with no copy to store."""
        parts = self.owner.parts[self.j]
        if num_new != 1 or len(parts) != 1 or not parts[0].head_major:
            return None
        return parts[0].k[:, :, start], parts[0].v[:, :, start]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        o = self.owner
        start, T = ctx.start, k.shape[2]
        end = start + T
        outs = []
        for p in o.parts[self.j]:
            r = p.rows
            qp, kp, vp, mp = q[r], k[r], v[r], ctx.mask[r]
            if p.head_major:
                for dst, src in ((p.k[:, :, start:end], kp), (p.v[:, :, start:end], vp)):
                    if not _same_view(dst, src):   # not written in place (new_rows)
                        dst.copy_(src)
                cast = o.rt.cast_scratch.cast
                outs.append(attention(qp, cast(p.k[:, :, :end], qp.dtype, 2, o.max_len, "k"),
                                      cast(p.v[:, :, :end], qp.dtype, 2, o.max_len, "v"), mp))
            elif p.tier == "disk":
                outs.append(self._attend_disk_rows(p, qp, kp, vp, mp, start, end))
            else:
                outs.append(self._attend_resident_rows(p, qp, kp, vp, mp, start, end))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _attend_resident_rows(self, p: Part, q, k, v, mask, start: int, end: int) -> torch.Tensor:
        """Compressed compute rows, or host rows (attended in place or over a prefetched copy)."""
        o = self.owner
        tk, tv = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)    # -> token-major
        if p.tier == "gpu":
            p.codec.write(p.home, start, tk, tv)
            return self._attend_store(p.codec, p.home, q, mask, end)
        if self._host_attn(q.shape[2]):
            if o.rt.mover.cuda:   # CPU attention beside a host cache: only q and the output cross
                p.codec.write(p.home, start, tk.cpu(), tv.cpu())
                o.rt.tiers.links.add("gpu->cpu", q.nbytes + 2 * tk.nbytes)
                out = self._attend_store(p.codec, p.home, q.cpu(), mask.cpu(), end)
                o.rt.tiers.links.add("cpu->gpu", out.nbytes)
                return out.to(o.rt.device)
            p.codec.write(p.home, start, tk, tv)
            return self._attend_store(p.codec, p.home, q, mask, end)
        # GPU attention over a prefetched copy; the new tokens go home asynchronously
        if p.work is None:
            self.prefetch(start, end - start)
        work = p.work
        torch.cuda.current_stream().wait_event(p.work_event)
        changed = p.codec.write(work, start, tk, tv)
        out = self._attend_store(p.codec, work, q, mask, end)
        for name, (a, b) in changed.items():
            if b > a:
                o.rt.mover.to_host(work[name][a:b], p.home[name][a:b], "gpu->cpu")
        self._release(p)
        return out

    def _attend_store(self, codec: Codec, store: Store, q: torch.Tensor, mask: torch.Tensor,
                      end: int) -> torch.Tensor:
        """Attention over a store's first ``end`` tokens, read back at the query's dtype."""
        k, v = codec.read(store, end)
        cast = self.owner.rt.cast_scratch.cast
        cap = self.owner.max_len
        return attention(q, _hm(cast(k, q.dtype, 0, cap, "k")), _hm(cast(v, q.dtype, 0, cap, "v")), mask)

    def _attend_disk_rows(self, p: Part, q, k, v, mask, start: int, end: int) -> torch.Tensor:
        o = self.owner
        if p.pending is None:
            self.prefetch(start, end - start)
        host = p.pending.result()
        tk, tv = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
        changed = p.codec.write(host, start, tk.to("cpu"), tv.to("cpu"))
        if p.on_host:
            out = self._attend_store(p.codec, host, q.to("cpu"), mask.to("cpu"), end).to(o.rt.device)
            if o.rt.mover.cuda:
                o.rt.tiers.links.add("gpu->cpu", q.nbytes)
        else:   # move the (compressed) prefix, dequantize and attend on the GPU
            dev = {}
            for name, t in host.items():
                dev[name], _ = o.rt.mover.to_compute(t[:p.codec.read_units(name, end)], "cpu->gpu")
            torch.cuda.current_stream().wait_stream(o.rt.mover.load_stream)
            out = self._attend_store(p.codec, dev, q, mask, end)
        base = o.layer_offset(self.j)

        def write(host: Store = host) -> None:
            n = 0
            for name, (a, b) in changed.items():
                if b > a:
                    t = host[name]
                    p.file_write(base + p.offsets[name] + a * unit_bytes(tuple(t.shape), t.dtype), t[a:b])
                    n += t[a:b].nbytes
            o.rt.tiers.links.add("cpu->disk", n)
        p.store = o.rt.io.submit(write)
        # the buffers stay referenced by the write closure until it lands
        self._release(p)
        return out


def _compute_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Head-major cache rows; on a CPU on huge pages, since each decode step writes one
    scattered column of every row (SmolLM2 at 256 rows: 358 vs 16 us per write)."""
    return host_heap.huge_empty(shape, dtype) if device.type == "cpu" else torch.empty(shape, dtype=dtype, device=device)


def _copy_prefix(codec: Codec, src: Store, dst: Store, tokens: int) -> int:
    n = 0
    for name, t in src.items():
        u = codec.read_units(name, tokens)
        if u:
            dst[name][:u].copy_(t[:u], non_blocking=True)
            n += t[:u].nbytes
    return n


def _store_nbytes(store: Store) -> int:
    return sum(t.nbytes for t in store.values())


def _hm(t: torch.Tensor) -> torch.Tensor:
    """token-major [S,n,H,D] -> head-major view [n,H,S,D]."""
    return t.permute(1, 2, 0, 3)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the same elements (a size-1 dimension's stride is arbitrary)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and all(n == 1 or x == y for n, x, y in zip(a.shape, a.stride(), b.stride())))


class KVCache:
    """Keys and values for one micro-batch of ``batch`` sequences, ``max_len`` columns,
    stored at ``dtype`` (which may be narrower than the compute dtype: attention casts
    what it reads) and compressed on every tier when ``quant`` is given."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, rt: Runtime,
                 shares: tuple[float, float, float] = (1.0, 0.0, 0.0), name: str = "kv",
                 quant: KVQuantConfig | None = None):
        self.cfg, self.max_len, self.dtype, self.rt = cfg, max_len, dtype, rt
        g, c, d = split_rows(batch, shares)
        codecs = {t: _codec(cfg, n, max_len, dtype, quant) for t, n in (("gpu", g), ("cpu", c), ("disk", d))}
        offsets, self.region = _disk_layout(codecs["disk"])
        self.file = None
        L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        shape = (g, H, max_len, D)
        # claimed before this cache is charged: buffers of another shape are dropped first
        kept = rt.kept.claim(rt.tiers, (shape, dtype, rt.device), 2 * L) if g and quant is None else []
        self.home_bytes = {"gpu": 0, "cpu": 0, "disk": 0}
        if d:
            rt.tiers.disk.alloc(L * self.region, "KV cache")
            self.file = rt.offload.new_file(f"{name}.bin", L * self.region)
            self.home_bytes["disk"] = L * self.region
        for tier, n in (("gpu", g), ("cpu", c)):
            if n:
                nb = L * codec_nbytes(codecs[tier])
                rt.tiers[tier].alloc(nb, "KV cache")
                self.home_bytes[tier] = nb
        self.parts: list[list[Part]] = []
        for _ in range(L):
            parts = []
            if g and quant is None:   # dense compute rows stay head-major, what attention wants
                parts.append(Part("gpu", slice(0, g), codecs["gpu"],
                                  *(kept.pop() if kept else _compute_empty(shape, dtype, rt.device) for _ in "kv")))
            elif g:
                parts.append(Part("gpu", slice(0, g), codecs["gpu"], home=empty_store(codecs["gpu"], device=rt.device)))
            if c:
                parts.append(Part("cpu", slice(g, g + c), codecs["cpu"],
                                  home=empty_store(codecs["cpu"], pin_memory=rt.mover.cuda)))
            if d:
                p = Part("disk", slice(g + c, batch), codecs["disk"], offsets=offsets)
                p.file_read = _file_io(self.file.read_into)
                p.file_write = _file_io(self.file.write_from)
                parts.append(p)
            self.parts.append(parts)
        self.layers = [LayerCache(self, j) for j in range(L)]
        self.dense_bytes = 2 * L * batch * max_len * H * D * dtype.itemsize
        rt.kv_add(self.home_bytes, self.dense_bytes)

    def layer_offset(self, j: int) -> int:
        return j * self.region

    def layer(self, j: int) -> LayerCache:
        return self.layers[j]

    def close(self) -> None:
        """Wait for pending writes and return the home bytes to their tiers; the dense compute
        rows' buffers go to the runtime's kept buffers, charged there, for the next cache."""
        for parts in self.parts:
            for p in parts:
                if p.store is not None:
                    p.store.result()
        for tier, n in self.home_bytes.items():
            if n:
                self.rt.tiers[tier].free(n)
        for parts in self.parts:   # the dense rows, for the next cache of this shape
            for p in parts:
                if p.head_major:
                    self.rt.kept.keep(self.rt.tiers, p.tier, p.k)
                    self.rt.kept.keep(self.rt.tiers, p.tier, p.v)
                    p.k = p.v = None
        self.rt.kv_add({t: -n for t, n in self.home_bytes.items()}, -self.dense_bytes)
        self.home_bytes = {}
        if self.file is not None:
            self.file.close()
            os.unlink(self.file.path)
            self.file = None

    def nbytes(self) -> int:
        return sum(self.home_bytes.values())


def _file_io(fn: Any) -> Any:
    """A DiskFile read/write taking a tensor (a leading-axis slice, so contiguous) as raw bytes."""
    def run(offset: int, t: torch.Tensor) -> None:
        fn(offset, t.view(-1).view(torch.uint8))
    return run
