"""The greedy head screened in int8 (kernels/head_screen.cpp): each logit estimated from int8
codes with a bound on its error, and only the ids that could still win computed exactly.

The answer is the AVX-512 head kernel's own argmax, id for id: the candidates' logits are the
very float32 sums it runs, and every id left out provably loses to one of them. The screen costs
an int8 copy of the weight (V x K bytes), so it is made only for a head weight that stays put:
one seen at two calls in a row, unchanged (the same tensor, memory and version). A streamed
head, new each step, keeps the plain kernel.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from .. import kernels

# Channels kept in bfloat16 (those largest on average in the first features seen): the rest
# then share one int8 step per row, 4-5x finer than with them (SmolLM2: 3-6 candidates a row).
OUTLIERS = 32
# The plain kernel sums a batch of up to this many rows in another order (lm_head_avx512.cpp's
# kFewRows); the screen reproduces the sums of larger batches.
FEW_ROWS = 16
# Calls whose candidates exceed this share of the ids (the bound too loose for these weights),
# STRIKES of them in a row, turn the screen off for the weight: computing that many one by one
# costs more than the screen saves.
MAX_CANDIDATE_SHARE = 1 / 64
STRIKES = 3
# The int8 copy is memory outside the tiers' plan: a head larger than this keeps the plain kernel.
MAX_CODES_BYTES = 128 << 20
# Float32 rounding in the estimate, in the exact sums and in the bound itself, per input dim,
# relative to max|e| * |x|_1 (twice the first-order bound; see head_screen.cpp).
PANEL = 8   # feature rows a kernel step takes (head_screen.cpp's kRows)
_ROUNDING = 2.0 ** -23
_UP = 1 + 2.0 ** -20   # the bound's factors, rounded up once more


@dataclass(frozen=True)
class Screen:
    """One head weight's codes: ``wq`` [V/16, KQ, 16, 4] uint8 (code + 128) over the channels
    ``rest``, ``wo`` [V/16, PO, 16] the ``outliers`` as bfloat16 pairs, ``ids`` [3, V/16 * 16]
    each id's step, |code|_1 * step and max|e|."""
    rest: torch.Tensor
    outliers: torch.Tensor
    wq: torch.Tensor
    wo: torch.Tensor
    ids: torch.Tensor

    @classmethod
    def make(cls, w: torch.Tensor, h: torch.Tensor) -> Screen:
        V, K = w.shape
        n_out = min(OUTLIERS, K // 16 * 2)
        outliers = h.float().abs().mean(0).topk(n_out).indices.sort().values
        keep = torch.ones(K, dtype=torch.bool)
        keep[outliers] = False
        rest = keep.nonzero()[:, 0]
        wr = w.index_select(1, rest).float()
        step, codes = _codes(wr)
        l1 = step.double() * codes.abs().sum(-1).double() * _UP
        em = w.float().abs().amax(-1)
        VB, KQ = -(-V // 16), -(-len(rest) // 4)
        wq = torch.full((VB * 16, KQ * 4), 128, dtype=torch.uint8)
        wq[:V, :len(rest)] = (codes.to(torch.int16) + 128).to(torch.uint8)
        wq = wq.view(VB, 16, KQ, 4).permute(0, 2, 1, 3).contiguous()
        wo = _pairs(w.index_select(1, outliers), VB * 16).view(VB, 16, -1).permute(0, 2, 1).contiguous()
        ids = torch.zeros(3, VB * 16)
        ids[0, :V], ids[1, :V], ids[2, :V] = step, l1.float(), em
        return cls(rest, outliers, wq, wo, ids)

    def argmax(self, mod, h: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each row's best id and how many candidates were computed exactly."""
        N, K = h.shape
        NP = -(-N // PANEL)
        x = h.float()
        xr = x.index_select(1, self.rest)
        step, codes = _codes(xr)
        KQ = self.wq.shape[1]
        xq = torch.zeros(NP * PANEL, KQ * 4, dtype=torch.int8)
        xq[:N, :xr.shape[1]] = codes
        xq = xq.view(NP, PANEL, KQ, 4).permute(0, 2, 1, 3).contiguous()
        xo = _pairs(h.index_select(1, self.outliers), NP * PANEL).view(NP, PANEL, -1).permute(0, 2, 1).contiguous()
        rows = torch.stack([step, codes.sum(-1, dtype=torch.int32).float(),
                            (0.5 * xr.double().abs().sum(-1) * _UP).float(), (0.5 * step.double() * _UP).float(),
                            ((2 * K + 64) * _ROUNDING * x.double().abs().sum(-1) * _UP).float()], 1)
        return mod.argmax(h, w, xq, xo, rows, self.wq, self.wo, self.ids)


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of float32 ``x`` and the row's step (0 for a zero row)."""
    step = x.abs().amax(-1) / 127
    div = torch.where(step > 0, step, torch.ones_like(step))
    return step, torch.round(x / div[:, None]).clamp_(-127, 127).to(torch.int8)


def _pairs(x: torch.Tensor, rows: int) -> torch.Tensor:
    """bfloat16 columns as int32 pairs, rows padded with zeros to ``rows``."""
    out = torch.zeros(rows, x.shape[1] // 2, dtype=torch.int32)
    out.view(torch.bfloat16)[:x.shape[0]] = x
    return out


@dataclass
class _Entry:
    ref: weakref.ref
    key: tuple[int, int]
    screen: Screen | None = None
    off: bool = False
    strikes: int = 0


_seen: dict[int, _Entry] = {}


def _serves(h: torch.Tensor, w: torch.Tensor):
    """The screen kernel where it reproduces the head kernel this CPU runs, else None."""
    if h.shape[0] <= FEW_ROWS or kernels.first_of(kernels.HEAD_KERNELS) != "lm_head_avx512":
        return None
    if w.dim() != 2 or w.shape[1] < 2 or w.stride(0) % 2 or h.stride(0) % 2 or w.stride(1) != 1:
        return None
    if w.shape[0] * w.shape[1] > MAX_CODES_BYTES:
        return None
    return kernels.load("head_screen")


def greedy(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """The greedy head's ids for bfloat16 features ``h`` [N, K] against the head weight ``w``,
    screened, or None where the plain kernel is to run (a head not seen unchanged before, a
    screen switched off, features that are not all finite, a CPU it does not reproduce)."""
    mod = _serves(h, w)
    if mod is None:
        return None
    key = (w.data_ptr(), w._version)
    entry = _seen.get(id(w))
    if entry is None or entry.ref() is not w or entry.key != key:
        for k in [k for k, e in _seen.items() if e.ref() is None]:
            del _seen[k]
        _seen[id(w)] = _Entry(weakref.ref(w), key)
        return None
    if entry.off or not bool(torch.isfinite(h).all()):
        return None
    if entry.screen is None:
        if not bool(torch.isfinite(w).all()):
            entry.off = True
            return None
        entry.screen = Screen.make(w, h)
    ids, candidates = entry.screen.argmax(mod, h, w)
    entry.strikes = entry.strikes + 1 if candidates > MAX_CANDIDATE_SHARE * h.shape[0] * w.shape[0] else 0
    if entry.strikes >= STRIKES:
        entry.off, entry.screen = True, None
    return ids
