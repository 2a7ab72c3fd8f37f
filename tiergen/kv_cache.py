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
from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .models.attention import attention
from .models.base import StepContext
from .policy import split_rows


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

    @property
    def host_compute(self) -> bool:
        """No GPU: host memory is the compute memory."""
        return self.device.type != "cuda"


@dataclass
class Part:
    tier: str
    rows: slice
    k: torch.Tensor | None = None    # gpu: [n,Hkv,S,D]; cpu: [S,n,Hkv,D]
    v: torch.Tensor | None = None
    file: Any = None                 # disk: DiskFile holding every layer's k then v
    # per-step working state
    work: tuple[torch.Tensor, torch.Tensor] | None = None
    work_bytes: int = 0
    work_tier: str = ""
    work_event: Any = None           # CUDA event: the prefetched copy has landed
    on_host: bool = True             # disk rows: attend on the CPU (vs copy to the GPU)
    pending: Future | None = None    # disk rows: the prefix read
    store: Future | None = None      # disk rows: the last token's write


def _row_bytes(cfg: ModelConfig, n: int, dtype: torch.dtype) -> int:
    return n * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                shares: tuple[float, float, float]) -> dict[str, int]:
    """Home bytes per tier for one micro-batch's cache over all layers."""
    g, c, d = split_rows(batch, shares)
    per_row = 2 * cfg.num_layers * max_len * _row_bytes(cfg, 1, dtype)
    return {"gpu": g * per_row, "cpu": c * per_row, "disk": d * per_row}


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
            if p.tier == "cpu" and (o.rt.host_compute or self._cpu_attn(num_new)):
                continue   # attention reads the host rows in place
            n = p.rows.stop - p.rows.start
            shape = (start + num_new, n, o.cfg.num_kv_heads, o.cfg.head_dim)
            if p.tier == "cpu":   # CUDA: copy the prefix on the load stream
                mover = o.rt.mover
                with torch.cuda.stream(mover.load_stream):
                    kw = torch.empty(shape, dtype=o.dtype, device=o.rt.device)
                    vw = torch.empty(shape, dtype=o.dtype, device=o.rt.device)
                    kw[:start].copy_(p.k[:start], non_blocking=True)
                    vw[:start].copy_(p.v[:start], non_blocking=True)
                    p.work_event = torch.cuda.Event()
                    p.work_event.record(mover.load_stream)
                for t in (kw, vw):
                    t.record_stream(torch.cuda.current_stream(o.rt.device))
                o.rt.tiers.links.add("cpu->gpu", 2 * start * _row_bytes(o.cfg, n, o.dtype))
                self._charge(p, "gpu", 2 * kw.nbytes)
                p.work = (kw, vw)
                continue
            # disk: one contiguous read per tensor into a host buffer
            if p.store is not None:
                p.store.result()     # the previous token's write must land first
                p.store = None
            kh = torch.empty(shape, dtype=o.dtype, pin_memory=o.rt.mover.cuda)
            vh = torch.empty(shape, dtype=o.dtype, pin_memory=o.rt.mover.cuda)
            on_host = o.rt.host_compute or self._cpu_attn(num_new)
            self._charge(p, "gpu" if o.rt.host_compute else "cpu", 2 * kh.nbytes)
            rb = _row_bytes(o.cfg, n, o.dtype)

            def read(p: Part = p, kh: torch.Tensor = kh, vh: torch.Tensor = vh) -> Any:
                if start:
                    for i, t in enumerate((kh, vh)):
                        p.file.read_into(o.offset(self.j, i, 0, rb), t[:start].view(-1).view(torch.uint8))
                    o.rt.tiers.links.add("disk->cpu" if o.rt.mover.cuda else "disk->gpu", 2 * start * rb)
                return kh, vh
            p.pending = o.rt.io.submit(read)
            p.on_host = on_host

    def _cpu_attn(self, num_new: int) -> bool:
        return self.owner.rt.cpu_attention and num_new == 1

    def _charge(self, p: Part, tier: str, n: int) -> None:
        self.owner.rt.tiers[tier].alloc(n, "KV cache working buffer")
        p.work_bytes, p.work_tier = p.work_bytes + n, tier

    def _release(self, p: Part) -> None:
        if p.work_bytes:
            self.owner.rt.tiers[p.work_tier].free(p.work_bytes)
        p.work, p.work_bytes, p.pending, p.work_event = None, 0, None, None

    # ---------------------------------------------------------------- attend
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        o = self.owner
        start, T = ctx.start, k.shape[2]
        end = start + T
        outs = []
        for p in o.parts[self.j]:
            r = p.rows
            qp, kp, vp, mp = q[r], k[r], v[r], ctx.mask[r]
            if p.tier == "gpu":
                p.k[:, :, start:end], p.v[:, :, start:end] = kp, vp
                outs.append(attention(qp, p.k[:, :, :end], p.v[:, :, :end], mp))
            elif p.tier == "cpu":
                outs.append(self._attend_host_rows(p, qp, kp, vp, mp, start, end))
            else:
                outs.append(self._attend_disk_rows(p, qp, kp, vp, mp, start, end))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 0)

    def _attend_host_rows(self, p: Part, q, k, v, mask, start: int, end: int) -> torch.Tensor:
        o = self.owner
        tk, tv = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)    # -> token-major
        if o.rt.host_compute or self._cpu_attn(q.shape[2]):
            if o.rt.mover.cuda:   # CPU attention beside a host cache: only q and the output cross
                p.k[start:end], p.v[start:end] = tk.cpu(), tv.cpu()
                o.rt.tiers.links.add("gpu->cpu", q.nbytes + 2 * tk.nbytes)
                out = attention(q.cpu(), _hm(p.k[:end]), _hm(p.v[:end]), mask.cpu())
                o.rt.tiers.links.add("cpu->gpu", out.nbytes)
                return out.to(o.rt.device)
            p.k[start:end], p.v[start:end] = tk, tv
            return attention(q, _hm(p.k[:end]), _hm(p.v[:end]), mask)
        # GPU attention over a prefetched copy; the new token goes home asynchronously
        if p.work is None:
            self.prefetch(start, end - start)
        kw, vw = p.work
        torch.cuda.current_stream().wait_event(p.work_event)
        kw[start:end], vw[start:end] = tk, tv
        out = attention(q, _hm(kw[:end]), _hm(vw[:end]), mask)
        o.rt.mover.to_host(tk, p.k[start:end], "gpu->cpu")
        o.rt.mover.to_host(tv, p.v[start:end], "gpu->cpu")
        self._release(p)
        return out

    def _attend_disk_rows(self, p: Part, q, k, v, mask, start: int, end: int) -> torch.Tensor:
        o = self.owner
        if p.pending is None:
            self.prefetch(start, end - start)
        kh, vh = p.pending.result()
        on_host = p.on_host
        tk, tv = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
        kh[start:end], vh[start:end] = tk.to("cpu"), tv.to("cpu")
        if on_host:
            out = attention(q.to("cpu"), _hm(kh[:end]), _hm(vh[:end]), mask.to("cpu")).to(o.rt.device)
            if o.rt.mover.cuda:
                o.rt.tiers.links.add("gpu->cpu", q.nbytes)
        else:
            kd, _ = o.rt.mover.to_compute(kh[:end], "cpu->gpu")
            vd, _ = o.rt.mover.to_compute(vh[:end], "cpu->gpu")
            torch.cuda.current_stream().wait_stream(o.rt.mover.load_stream)
            out = attention(q, _hm(kd), _hm(vd), mask)
        rb = _row_bytes(o.cfg, p.rows.stop - p.rows.start, o.dtype)
        j = self.j

        def write(kh: torch.Tensor = kh, vh: torch.Tensor = vh) -> None:
            for i, t in enumerate((kh, vh)):
                p.file.write_from(o.offset(j, i, start, rb), t[start:end].contiguous().view(-1).view(torch.uint8))
            o.rt.tiers.links.add("cpu->disk", 2 * (end - start) * rb)
        p.store = o.rt.io.submit(write)
        # the buffers stay referenced by the write closure until it lands
        self._release(p)
        return out


def _hm(t: torch.Tensor) -> torch.Tensor:
    """token-major [S,n,H,D] -> head-major view [n,H,S,D]."""
    return t.permute(1, 2, 0, 3)


class KVCache:
    """Keys and values for one micro-batch of ``batch`` sequences, ``max_len`` columns."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, rt: Runtime,
                 shares: tuple[float, float, float] = (1.0, 0.0, 0.0), name: str = "kv"):
        self.cfg, self.max_len, self.dtype, self.rt = cfg, max_len, dtype, rt
        g, c, d = split_rows(batch, shares)
        self.region = max_len * _row_bytes(cfg, d, dtype)
        self.region = -(-self.region // 4096) * 4096
        file = self.file = None
        if d:
            total = cfg.num_layers * 2 * self.region
            rt.tiers.disk.alloc(total, "KV cache")
            file = self.file = rt.offload.new_file(f"{name}.bin", total)
        self.home_bytes = {"gpu": 0, "cpu": 0, "disk": cfg.num_layers * 2 * self.region if d else 0}
        self.parts: list[list[Part]] = []
        H, D = cfg.num_kv_heads, cfg.head_dim
        for _ in range(cfg.num_layers):
            parts = []
            if g:
                shape = (g, H, max_len, D)
                parts.append(Part("gpu", slice(0, g), torch.empty(shape, dtype=dtype, device=rt.device),
                                  torch.empty(shape, dtype=dtype, device=rt.device)))
            if c:
                shape = (max_len, c, H, D)
                parts.append(Part("cpu", slice(g, g + c), rt.mover.host_empty(shape, dtype),
                                  rt.mover.host_empty(shape, dtype)))
            if d:
                parts.append(Part("disk", slice(g + c, batch), file=file))
            self.parts.append(parts)
        for tier, n in (("gpu", g), ("cpu", c)):
            nb = cfg.num_layers * 2 * max_len * _row_bytes(cfg, n, dtype)
            if nb:
                rt.tiers[tier].alloc(nb, "KV cache")
                self.home_bytes[tier] = nb
        self.layers = [LayerCache(self, j) for j in range(cfg.num_layers)]

    def offset(self, j: int, kind: int, token: int, row_bytes: int) -> int:
        return (2 * j + kind) * self.region + token * row_bytes

    def layer(self, j: int) -> LayerCache:
        return self.layers[j]

    def close(self) -> None:
        """Wait for pending writes and return the home bytes to their tiers."""
        for parts in self.parts:
            for p in parts:
                if p.store is not None:
                    p.store.result()
        for tier, n in self.home_bytes.items():
            if n:
                self.rt.tiers[tier].free(n)
        self.home_bytes = {}
        if self.file is not None:
            self.file.close()
            os.unlink(self.file.path)
            self.file = None

    def nbytes(self) -> int:
        return sum(self.home_bytes.values())

