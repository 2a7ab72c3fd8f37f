"""Weights placed over gpu / cpu / disk by whole tensors, streamed to the compute device.

Each group (embed, every layer, head) is split by the policy's weight shares:
tensors are taken in order and a tensor goes to the tier in which the midpoint
of its byte range falls. Disk-homed tensors of a group are packed into one file
at 4 KiB-aligned offsets, so fetching them is one large direct read.

With a weight ``QuantConfig``, every 2-D matrix of the layers and an untied
lm_head is quantized while loading, tensor by tensor, and kept as a blob
(``quant.to_blob``) on its tier: it is placed, stored, read and moved
compressed, and dequantized on the compute device when ``group`` first asks
for it -- once per block, however many micro-batches use it. Embedding tables
(and a tied lm_head, which is the token embedding), norms and biases stay dense.

Weights homed off the compute tier may be kept at a narrower ``store`` dtype than
the compute dtype (a bfloat16 checkpoint run in float32 on a CPU): they cross the
slow links at their own size and are cast once per block, like a dequantize.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels
from ..disk import IOPool, OffloadDir, aligned_empty
from ..errors import CheckpointError
from ..models.base import HEAD_SLICE_ROWS, Model, Weights
from ..quant import QuantConfig, blob_nbytes, dequantize, dequantize_into, from_blob, quantize, to_blob
from ..tiers import Tiers
from ..transfer import Mover, Ready
from . import prepack, screen, tiles
from .fusion import fuse_tensors, group_label
from .source import ModelSource

ALIGN = 4096


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def compressed(g: str | int, key: str, shape: tuple[int, ...], tied: bool) -> bool:
    """Which weights a weight QuantConfig applies to: layer matrices and an untied lm_head.
    A tied one stays dense like the embedding it is: 4-bit groups of 32 on the embedded
    SmolLM2's tied head cost +6.2% perplexity (14.49 -> 15.39), against +0.3% for the layers."""
    if len(shape) != 2 or g == "embed":
        return False
    return not (tied and key == "lm_head")


def stored_dtype(quantized: bool, tier: str, dtype: torch.dtype, store: torch.dtype | None) -> torch.dtype:
    """A weight's dtype as kept on ``tier`` (a blob's: its scales'): the compute dtype for a
    dense weight on the compute tier, the store dtype everywhere else."""
    return dtype if tier == "gpu" and not quantized else store or dtype


def stored_nbytes(g: str | int, key: str, shape: tuple[int, ...], dtype: torch.dtype,
                  quant: QuantConfig | None, tied: bool, tier: str = "cpu",
                  store: torch.dtype | None = None) -> int:
    """Bytes of one weight as kept on ``tier``: a blob, or dense at its ``stored_dtype``."""
    q = quant is not None and compressed(g, key, shape, tied)
    dt = stored_dtype(q, tier, dtype, store)
    return blob_nbytes(shape, dt, quant) if q else _nbytes(shape, dt)


def converted(g: str | int, key: str, shape: tuple[int, ...], dtype: torch.dtype, quant: QuantConfig | None,
              tied: bool, tier: str, store: torch.dtype | None) -> bool:
    """Whether a weight is stored in a form the compute device must convert before use."""
    q = quant is not None and compressed(g, key, shape, tied)
    return q or stored_dtype(q, tier, dtype, store) != dtype


def place_group(sizes: dict[str, int], shares: tuple[float, float, float]) -> dict[str, str]:
    """Tier of each tensor (bytes as stored): the one its byte range's midpoint falls in."""
    total = sum(sizes.values()) or 1
    out, before = {}, 0
    for k, n in sizes.items():
        mid = (before + n / 2) / total
        out[k] = "gpu" if mid < shares[0] else "cpu" if mid < shares[0] + shares[1] else "disk"
        before += n
    return out


def packs_head(tier: str, stored: torch.dtype, quantized: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether an LM head homed on ``tier`` (kept there at ``stored``) is kept as packed
    vocabulary slices (prepack.PackedRows): in host memory, computed with in place without a
    GPU, dense at the compute dtype, one oneDNN packs. One stored narrower or wider is cast
    per block instead. A tied one then takes a copy of its own beside the embedding's. Where
    a head kernel serves the compute dtype, it reads the plain rows: nothing is packed."""
    return (device.type == "cpu" and tier != "disk" and not quantized and stored == dtype
            and prepack.available(dtype) and not head_kernel_serves(dtype))


def head_kernel_serves(dtype: torch.dtype) -> bool:
    """Whether a CPU head at ``dtype`` runs on a head kernel (models/base.py ``head_kernel``)."""
    return dtype == torch.bfloat16 and kernels.head_kernel() is not None


def placed_shapes(model: Model) -> tuple[dict[str | int, dict[str, tuple[int, ...]]], bool]:
    """The model's weight groups, with a tied lm_head placed as a head tensor of its own."""
    shapes = dict(model.shapes())
    tied = "lm_head" not in shapes["head"]
    if tied:
        shapes["head"] = {**shapes["head"], "lm_head": shapes["embed"]["tok"]}
    return shapes, tied


def group_sizes(model: Model, dtype: torch.dtype, quant: QuantConfig | None,
                store: torch.dtype | None = None) -> tuple[dict[str | int, dict[str, int]], bool]:
    """Bytes of every weight as stored off the compute tier, by group (what placement splits)."""
    shapes, tied = placed_shapes(model)
    return {g: {k: stored_nbytes(g, k, s, dtype, quant, tied, "cpu", store) for k, s in gs.items()}
            for g, gs in shapes.items()}, tied


def placement_bytes(model: Model, dtype: torch.dtype, shares: tuple[float, float, float],
                    quant: QuantConfig | None = None, store: torch.dtype | None = None) -> dict[str, int]:
    """Bytes per tier for the whole model as stored, the largest streamed group (for
    buffers) and the largest group's dequantized or cast size (compute scratch)."""
    sizes, tied = group_sizes(model, dtype, quant, store)
    shapes, _ = placed_shapes(model)
    places = {g: place_group(s, shares) for g, s in sizes.items()}
    out = {"gpu": 0, "cpu": 0, "disk": 0, "max_streamed_group": 0, "max_streamed_layer": 0, "streamed_head": 0,
           "max_dequantized_group": 0, "shared_head_gpu": 0, "shared_head_cpu": 0}
    for g, group in sizes.items():
        streamed = dense = 0
        for k, tier in places[g].items():
            n = stored_nbytes(g, k, shapes[g][k], dtype, quant, tied, tier, store)
            shared = tied and (g, k) == ("head", "lm_head") and tier == places["embed"]["tok"] != "disk"
            out[tier] += 0 if shared else n
            if shared:
                out[f"shared_head_{tier}"] += n
            streamed += n if tier != "gpu" else 0
            if converted(g, k, shapes[g][k], dtype, quant, tied, tier, store) and (g, k) not in GATHERED:
                dense += _nbytes(shapes[g][k], dtype)
        out["max_streamed_group"] = max(out["max_streamed_group"], streamed)
        if isinstance(g, int):
            out["max_streamed_layer"] = max(out["max_streamed_layer"], streamed)
        elif g == "head":
            out["streamed_head"] = streamed
        out["max_dequantized_group"] = max(out["max_dequantized_group"], dense)
    return out


@dataclass
class Home:
    tier: str
    shape: tuple[int, ...]
    nbytes: int                             # as stored (a compressed blob's size)
    dtype: torch.dtype                      # as stored (a blob's scales)
    quant: QuantConfig | None = None        # set: stored as a quantized blob
    tensor: torch.Tensor | None = None      # gpu / cpu homes
    offset: int = 0                         # disk homes: byte offset in the group's file


class BufferPool:
    """Reuses aligned host buffers by size: page-faulting a fresh buffer per fetch
    would cost as much as the read."""

    def __init__(self, pin: bool):
        self.pin, self.free_lists = pin, {}

    def take(self, nbytes: int) -> torch.Tensor:
        lst = self.free_lists.get(nbytes)
        return lst.pop() if lst else aligned_empty(nbytes, pin=self.pin)

    def give(self, buf: torch.Tensor) -> None:
        self.free_lists.setdefault(buf.numel(), []).append(buf)


class TieredWeights:
    """The engine's WeightStore: ``acquire`` starts fetching a group, ``group`` waits
    for it on the compute device, ``release`` frees its streamed buffers."""

    def __init__(self, source: ModelSource, model: Model, dtype: torch.dtype, device: torch.device,
                 shares: tuple[float, float, float], tiers: Tiers, offload: OffloadDir | None,
                 io: IOPool, mover: Mover, pin: bool = True, quant: QuantConfig | None = None,
                 store: torch.dtype | None = None):
        self.dtype, self.device, self.tiers, self.io, self.mover = dtype, device, tiers, io, mover
        self.store = store or dtype
        self.pool = BufferPool(pin and mover.cuda)
        self.cast_pool = BufferPool(False)   # host compute: cast copies of narrower stored weights
        # a tied lm_head is placed as a head tensor of its own; it shares storage when homes agree
        shapes, self.tied = placed_shapes(model)
        sizes, _ = group_sizes(model, dtype, quant, self.store)
        self.homes: dict[str | int, dict[str, Home]] = {}
        self.files: dict[str | int, Any] = {}
        self.disk_span: dict[str | int, int] = {}
        for g, group_shapes in shapes.items():
            place = place_group(sizes[g], shares)
            homes, off = {}, 0
            for k, s in group_shapes.items():
                s, tier = tuple(s), place[k]
                q = quant if quant is not None and compressed(g, k, s, self.tied) else None
                n = stored_nbytes(g, k, s, dtype, quant, self.tied, tier, self.store)
                homes[k] = Home(tier, s, n, stored_dtype(q is not None, tier, dtype, self.store), q)
                if tier == "disk" and (g, k) in GATHERED:
                    self._new_file((g, k), -(-n // ALIGN) * ALIGN, offload)   # a file of its own, read by rows
                elif tier == "disk":
                    homes[k].offset = off
                    off += -(-n // ALIGN) * ALIGN
            self.homes[g] = homes
            if off:
                self._new_file(g, off, offload)
        self._load_all(source, model, shapes, pin)
        self._allow_head_screen()
        _return_freed_memory()
        self.loaded: dict[str | int, tuple[Ready, int, torch.Tensor | None]] = {}

    def _allow_head_screen(self) -> None:
        """A plain bf16 head resident in host memory may take the greedy head's int8 screen
        (weights/screen.py), which charges its codes to the head's tier when it makes them."""
        h = self.homes["head"].get("lm_head")
        if (h is not None and h.tier != "disk" and self.device.type == "cpu" and isinstance(h.tensor, torch.Tensor)
                and h.tensor.dtype == torch.bfloat16 and self.dtype == torch.bfloat16):
            screen.allow(h.tensor, self.tiers[h.tier])

    def _load_all(self, source: ModelSource, model: Model, shapes: dict, pin: bool) -> None:
        seen: set[tuple[Any, str]] = set()
        tensors = fuse_tensors(source.tensors(model, self.dtype), model.fusion, model.checkpoint_shapes(),
                               source.description)
        for (g, key), t in tensors:
            if self.tied and (g, key) == ("head", "lm_head"):
                continue   # a checkpoint's copy of tied embeddings
            if g not in shapes or key not in shapes[g]:   # a config that does not describe the checkpoint
                raise CheckpointError(f"{source.description}: weight {key!r} of {group_label(g)} is not in the model "
                                      f"its config describes (a bias, a layer or a norm it does not have)")
            if tuple(t.shape) != tuple(shapes[g][key]):
                raise CheckpointError(f"{source.description}: weight {key!r} of {group_label(g)} has shape "
                                      f"{tuple(t.shape)}, expected {tuple(shapes[g][key])}")
            self._store(g, key, t, pin)
            seen.add((g, key))
            if self.tied and (g, key) == ("embed", "tok"):
                self._store("head", "lm_head", t, pin, share=self.homes["embed"]["tok"])
                seen.add(("head", "lm_head"))
        for g, group_shapes in shapes.items():
            for key in group_shapes:
                if (g, key) not in seen:
                    raise CheckpointError(f"{source.description}: missing weight {key!r} of {group_label(g)}")

    def _new_file(self, key: Any, nbytes: int, offload: OffloadDir | None) -> None:
        if offload is None:
            raise ValueError("disk-homed weights need an offload directory")
        self.tiers.disk.alloc(nbytes, f"weights of {key}")
        name = "_".join(str(x) for x in key) if isinstance(key, tuple) else str(key)
        self.files[key] = offload.new_file(f"weights_{name}.bin", nbytes)
        self.disk_span[key] = nbytes

    def _store(self, g: str | int, key: str, t: torch.Tensor, pin: bool, share: Home | None = None) -> None:
        """Home a checkpoint tensor as its Home says: a quantized blob or a dense copy at its dtype."""
        h = self.homes[g][key]
        packed_head = (g, key) == ("head", "lm_head") and packs_head(h.tier, h.dtype, h.quant is not None,
                                                                      self.dtype, self.device)
        if share is not None and share.tier == h.tier != "disk":
            if packed_head:   # the embedding gathers rows from its plain copy; the head gets a packed one
                self.tiers[h.tier].alloc(h.nbytes, "packed LM head")
                h.tensor = prepack.PackedRows(share.tensor, HEAD_SLICE_ROWS)
            else:
                h.tensor = share.tensor      # tied head on the embedding's tier: one copy, counted once
            return
        t = to_blob(quantize(t.to(h.dtype), h.quant)) if h.quant else t.to(h.dtype).contiguous()
        if packed_head:
            self.tiers[h.tier].alloc(h.nbytes, f"weight {key} of {group_label(g)}")
            h.tensor = prepack.PackedRows(t, HEAD_SLICE_ROWS)
            return
        if h.tier == "gpu":
            self.tiers.gpu.alloc(h.nbytes, f"weight {key} of {group_label(g)}")
            h.tensor = self._maybe_pack(g, key, h, t.to(self.device))
        elif h.tier == "cpu":
            self.tiers.cpu.alloc(h.nbytes, f"weight {key} of {group_label(g)}")
            h.tensor = t.pin_memory() if pin and self.mover.cuda else self._maybe_pack(g, key, h, t)
        else:
            self.files[(g, key) if (g, key) in GATHERED else g].write_from(h.offset, t.view(-1).view(torch.uint8))
            self.tiers.links.add("cpu->disk", t.nbytes)

    def _maybe_pack(self, g: str | int, key: str, h: Home, t: torch.Tensor) -> Any:
        """A layer matrix the CPU computes with in place, at the compute dtype, is packed once:
        in the tile layout where a product kernel serves (weights/tiles.py), else for oneDNN."""
        if not (isinstance(g, int) and h.quant is None and h.dtype == self.dtype and self.device.type == "cpu"
                and t.dim() == 2):
            return t
        if tiles.holds(t):
            packed = tiles.TilePacked(t)
            if packed.nbytes > h.nbytes:   # tiles pad rows to 32 and columns to 32
                self.tiers[h.tier].alloc(packed.nbytes - h.nbytes, f"tile padding of weight {key} of {group_label(g)}")
            return packed
        return prepack.pack(t) if prepack.packable(t) else t

    # ------------------------------------------------------------- streaming
    def acquire(self, g: str | int) -> None:
        """Start bringing group g to the compute device (no-op if already on its way)."""
        if g in self.loaded:
            return
        homes = self.homes[g]
        out: Weights = {}
        events = []
        charged = 0
        for k, h in homes.items():
            if h.tier == "gpu":
                out[k] = h.tensor
            elif (g, k) in GATHERED:
                out[k] = RowGather(self, g, k)
            elif h.tier == "cpu":
                out[k], ev = self.mover.to_compute(h.tensor, "cpu->gpu")
                if ev is not None:
                    events.append(ev)
                    charged += h.tensor.nbytes
        disk_keys = [k for k, h in homes.items() if h.tier == "disk" and (g, k) not in GATHERED]
        buf = None
        if disk_keys:
            span, base = self.disk_span[g], 0
            buf = self.pool.take(span)
            link = "disk->cpu" if self.mover.cuda else "disk->gpu"
            # The host buffer is compute memory without a GPU, staging memory with one.
            (self.tiers.cpu if self.mover.cuda else self.tiers.gpu).alloc(span, f"streamed weights of {group_label(g)}")
            charged_host = span
            file = self.files[g]

            def read() -> tuple[Weights, Any]:
                file.read_into(base, buf)
                self.tiers.links.add(link, span)
                res: Weights = {}
                last_ev = None
                for k in disk_keys:
                    h = homes[k]
                    view = buf[h.offset - base:h.offset - base + h.nbytes]
                    if h.quant is None:
                        view = view.view(h.dtype).view(h.shape)
                    res[k], ev = self.mover.to_compute(view, "cpu->gpu")
                    last_ev = ev or last_ev
                return res, last_ev
            fut = self.io.submit(read)
        else:
            charged_host, fut = 0, None
        if charged:
            self.tiers.gpu.alloc(charged, f"streamed weights of {group_label(g)}")
        if self.mover.cuda and disk_keys:
            self.tiers.gpu.alloc(sum(homes[k].nbytes for k in disk_keys), f"streamed weights of {group_label(g)}")
            charged += sum(homes[k].nbytes for k in disk_keys)
        ready = _GroupReady(out, events, fut, self._converter(g))
        self.loaded[g] = (ready, charged, buf, charged_host)

    def group(self, g: str | int) -> Weights:
        self.acquire(g)
        return self.loaded[g][0].get()

    def _converter(self, g: str | int) -> Any:
        """Turns a group's landed blobs (and narrower stored copies) into dense compute-dtype
        weights on the compute device, charging them to compute memory until release."""
        todo = {k: h for k, h in self.homes[g].items()
                if (h.quant is not None or h.dtype != self.dtype) and (g, k) not in GATHERED}
        if not todo:
            return None

        def run(out: Weights, pooled: list[torch.Tensor]) -> int:
            dense = 0
            for k, h in todo.items():
                src = from_blob(out[k], h.shape, h.dtype, h.quant) if h.quant is not None else out[k]
                if self.mover.cuda:
                    out[k] = dequantize(src, self.dtype) if h.quant is not None else src.to(self.dtype)
                else:
                    # into a reused host buffer: faulting in fresh pages for every copy cost
                    # 4x the copy itself (bf16 -> float32, 200 MB: 51 vs 13 ms here)
                    buf = self.cast_pool.take(math.prod(h.shape) * self.dtype.itemsize)
                    pooled.append(buf)
                    dst = buf.view(self.dtype).view(h.shape)
                    out[k] = dequantize_into(src, dst) if h.quant is not None else dst.copy_(src)
                dense += out[k].nbytes
            self.tiers.gpu.alloc(dense, f"dequantized weights of {group_label(g)}")
            return dense
        return run

    def release(self, g: str | int) -> None:
        item = self.loaded.pop(g, None)
        if item is None:
            return
        ready, charged, buf, charged_host = item
        ready.get()   # never recycle a buffer a read is still filling
        charged += ready.dense
        for b in ready.pooled:
            self.cast_pool.give(b)
        if buf is not None:
            ready.wait_copies()   # ...or one an async host->device copy is still reading
        if charged:
            self.tiers.gpu.free(charged)
        if buf is not None:
            (self.tiers.cpu if self.mover.cuda else self.tiers.gpu).free(charged_host)
            self.pool.give(buf)

    def streamed(self, g: str | int) -> bool:
        return any(h.tier != "gpu" for h in self.homes[g].values())

    def nbytes_by_tier(self, dense: bool = False) -> dict[str, int]:
        """Bytes per tier as stored, or (``dense``) as they would be uncompressed."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        seen = set()
        for homes in self.homes.values():
            for h in homes.values():
                key = id(h.tensor) if h.tensor is not None else id(h)
                if key not in seen:
                    seen.add(key)
                    out[h.tier] += _nbytes(h.shape, self.dtype) if dense else h.nbytes
        return out


def _return_freed_memory() -> None:
    """Loading (quantizing above all) frees many mid-sized float32 temporaries that glibc
    keeps in its heap; hand them back so a memory-capped run has that room."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing to do
        pass


# Tables the model only indexes by token id: fetched row by row, never whole.
GATHERED = {("embed", "tok")}


class RowGather:
    """Stands in for an embedding table homed off the compute device: ``table[ids]``
    fetches just the rows those ids need (one small read per distinct id on disk)."""

    def __init__(self, store: "TieredWeights", g: str | int, key: str):
        self.store, self.home = store, store.homes[g][key]
        self.file = store.files.get((g, key))

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        st, h = self.store, self.home
        flat = ids.reshape(-1).cpu()
        uniq, inverse = torch.unique(flat, return_inverse=True)
        width = h.shape[1]
        if h.tier == "cpu":
            rows = h.tensor[uniq]
        else:
            rows = torch.empty(len(uniq), width, dtype=h.dtype)
            row_bytes = rows[0].nbytes
            for i, t in enumerate(uniq.tolist()):
                self.file.read_into(h.offset + t * row_bytes, rows[i].view(torch.uint8))
            st.tiers.links.add("disk->cpu" if st.mover.cuda else "disk->gpu", rows.nbytes)
        out = rows[inverse].view(*ids.shape, width)
        if st.mover.cuda:   # cross the link at the stored size, cast on the GPU
            st.tiers.links.add("cpu->gpu", out.nbytes)
            out = out.to(st.device)
        return out.to(st.dtype)


class _GroupReady:
    """A group's tensors: resident ones now, streamed ones when their copies land."""

    def __init__(self, out: Weights, events: list, fut: Any, dequantize: Any = None):
        self.out, self.events, self.fut, self.done = out, events, fut, False
        self.dequantize, self.dense = dequantize, 0
        self.pooled: list[torch.Tensor] = []   # reused buffers the dense copies live in

    def wait_copies(self) -> None:
        for ev in self.events:
            ev.synchronize()

    def get(self) -> Weights:
        if not self.done:
            if self.fut is not None:
                res, ev = self.fut.result()
                self.out.update(res)
                if ev is not None:
                    self.events.append(ev)
            for ev in self.events:
                torch.cuda.current_stream().wait_event(ev)
            if self.dequantize is not None:
                self.out = dict(self.out)   # keep the blobs of a resident group untouched
                self.dense = self.dequantize(self.out, self.pooled)
            self.done = True
        return self.out
