"""The greedy head screened in int8 (kernels/head_screen.cpp): each logit estimated from int8
codes with a bound on its error, and only the ids that could still win computed exactly.

The answer is the AVX-512 head kernel's own argmax, id for id: the candidates' logits are the
very float32 sums it runs, and every id left out provably loses to one of them. The screen costs
an int8 copy of the weight (about V x K bytes), so it serves only a head resident in host memory
(weights/tiered.py ``allow``s it) and unchanged since (the same tensor, memory and version); its
codes are charged to the head's tier when made, and made only where they fit. A streamed head
keeps the plain kernel.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Iterable

import torch

from .. import kernels
from ..errors import PolicyDoesNotFitError
from ..tiers import Tier

# Channels kept in bfloat16 (those largest on average in the first features seen): the rest
# then share one int8 step per row, 4-5x finer than with them (SmolLM2: 3-9 candidates a row).
OUTLIERS = 32
# The plain kernel sums a batch of up to this many rows in another order (lm_head_avx512.cpp's
# kFewRows); the screen reproduces the sums of larger batches.
FEW_ROWS = 16
# Calls whose candidates exceed this share of the ids (the bound too loose for these weights),
# STRIKES of them in a row, turn the screen off for the weight: computing that many one by one
# costs more than the screen saves.
MAX_CANDIDATE_SHARE = 1 / 64
STRIKES = 3
# A head with more codes than this keeps the plain kernel (the exact pass indexes the weight in
# 32-bit offsets; the codes are charged to the head's tier in any case).
MAX_CODES_BYTES = 1 << 30
# Ids' blocks of 16 whose codes are made at a time.
MAKE_BLOCKS = 256
PANEL = 8   # feature rows a kernel step takes (head_screen.cpp's kRows)
# Float32 rounding in the estimate, in the exact sums and in the bound itself, per input dim,
# relative to max|e| * |x|_1 (twice the first-order bound; see head_screen.cpp).
_ROUNDING = 2.0 ** -23
_UP = 1 + 2.0 ** -20   # the bound's factors, rounded up once more
# The bound is relative (float32 rounding) and so holds only where no sum overflows and nothing
# falls below float32's normal range: vdpbf16ps, in the exact sums and in the outliers' estimate,
# reads subnormal inputs and writes subnormal results as zeros (a weight row of subnormals scores
# 0 exactly, but its int8 estimate does not), and an estimate's intermediate (the int8 sum times
# the weight's step, before the features') can overflow where the logit does not. So the screen
# serves only features and weights without subnormals whose magnitudes keep every sum within
# 2^+-100 (see ``Screen.serves``); any real model's are many decades inside that.
_TINY = 2.0 ** -126    # float32's (and bfloat16's) least normal magnitude
_SPAN = 2.0 ** 100
MAX_K = 1 << 16        # int8 sums of 127 x 127 x K stay in int32 (vpdpbusd wraps)


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
    w_lo: float = 0.0   # the weight's least nonzero |value| (inf: all zero) and its largest
    w_hi: float = 0.0

    @property
    def nbytes(self) -> int:
        return codes_bytes(self.wq.shape[0] * 16, self.rest.numel() + self.outliers.numel())

    @classmethod
    def make(cls, w: torch.Tensor, h: torch.Tensor) -> Screen:
        V, K = w.shape
        n_out = min(OUTLIERS, K // 16 * 2)   # as codes_bytes counts them
        outliers = h.float().abs().mean(0).topk(n_out).indices.sort().values
        keep = torch.ones(K, dtype=torch.bool)
        keep[outliers] = False
        rest = keep.nonzero()[:, 0]
        VB, KQ = -(-V // 16), -(-len(rest) // 4)
        wq = torch.empty(VB, KQ, 16, 4, dtype=torch.uint8)
        wo = torch.empty(VB, n_out // 2, 16, dtype=torch.int32)
        ids = torch.zeros(3, VB * 16)
        w_lo = float("inf")
        for b0 in range(0, VB, MAKE_BLOCKS):   # a slice of ids at a time: little transient memory
            b1 = min(VB, b0 + MAKE_BLOCKS)
            r0, r1 = 16 * b0, min(V, 16 * b1)
            part = w[r0:r1]
            step, codes = _codes(part.index_select(1, rest).float())
            padded = torch.full((16 * (b1 - b0), KQ * 4), 128, dtype=torch.uint8)
            padded[:r1 - r0, :len(rest)] = (codes.to(torch.int16) + 128).to(torch.uint8)
            wq[b0:b1] = _blocked(padded.view(-1, KQ, 4), 16)
            wo[b0:b1] = _blocked(_pairs(part.index_select(1, outliers), 16 * (b1 - b0)), 16)
            ids[0, r0:r1] = step
            ids[1, r0:r1] = (step.double() * codes.abs().sum(-1).double() * _UP).float()
            a = part.float().abs()
            ids[2, r0:r1] = a.amax(-1)
            w_lo = min(w_lo, float(torch.where(a > 0, a, float("inf")).amin()))
        return cls(rest, outliers, wq, wo, ids, w_lo, float(ids[2].max()))

    def serves(self, h: torch.Tensor) -> bool | None:
        """Whether the bound holds for features ``h`` against this weight (None: for no features,
        a weight with subnormals or too large): all finite, none subnormal, every row's largest
        |value| times the weight's least nonzero one at least 2^-100, and the largest sums
        (K^2 max|w| max|h|, K max|w|, K max|h|) under 2^100."""
        K = h.shape[1]
        if self.w_lo < _TINY or self.w_hi * K >= _SPAN or K > MAX_K:
            return None
        a = h.float().abs()
        top = a.amax(-1)   # NaN where a row has one, inf where it has an inf
        hi = float(top.max())
        if not hi * K < _SPAN or not hi * self.w_hi * K * K < _SPAN:   # NaN fails too
            return False
        if bool(((a < _TINY) & (a > 0)).any()):
            return False
        return bool(((top == 0) | (top * self.w_lo >= 1 / _SPAN)).all())

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
        xq = _blocked(xq.view(-1, KQ, 4), PANEL).contiguous()
        xo = _blocked(_pairs(h.index_select(1, self.outliers), NP * PANEL), PANEL).contiguous()
        rows = torch.stack([step, codes.sum(-1, dtype=torch.int32).float(),
                            (0.5 * xr.double().abs().sum(-1) * _UP).float(), (0.5 * step.double() * _UP).float(),
                            ((2 * K + 64) * _ROUNDING * x.double().abs().sum(-1) * _UP).float()], 1)
        return mod.argmax(h, w, xq, xo, rows, self.wq, self.wo, self.ids)


def codes_bytes(V: int, K: int) -> int:
    """Bytes of a [V, K] head's screen: per id (padded to 16) its codes, its outlier pairs and
    three float32 terms; the two channel lists."""
    n_out = min(OUTLIERS, K // 16 * 2)
    return -(-V // 16) * 16 * (-(-(K - n_out) // 4) * 4 + 2 * n_out + 12) + 8 * K


def _codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of float32 ``x`` and the row's step (0 for a zero row)."""
    step = x.abs().amax(-1) / 127
    div = torch.where(step > 0, step, torch.ones_like(step))
    return step, torch.round(x / div[:, None]).clamp_(-127, 127).to(torch.int8)


def _blocked(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Rows [n * rows, C, ...] as blocks [n, C, rows, ...]: each of a block's C columns (a 4-byte
    code group or pair) holds its ``rows`` rows side by side, as the kernel broadcasts or loads them."""
    return t.view(t.shape[0] // rows, rows, *t.shape[1:]).transpose(1, 2)


def _pairs(x: torch.Tensor, rows: int) -> torch.Tensor:
    """bfloat16 columns as int32 pairs, rows padded with zeros to ``rows``."""
    out = torch.zeros(rows, x.shape[1] // 2, dtype=torch.int32)
    out.view(torch.bfloat16)[:x.shape[0]] = x
    return out


@dataclass
class _Entry:
    ref: weakref.ref
    key: tuple[int, int]
    tier: Tier
    screen: Screen | None = None
    off: bool = False
    strikes: int = 0

    def drop(self, off: bool = False) -> None:
        if self.screen is not None:
            self.tier.free(self.screen.nbytes)
            self.screen = None
        self.off = self.off or off


_allowed: dict[int, _Entry] = {}


def allow(w: torch.Tensor, tier: Tier) -> None:
    """Let the screen serve the resident head weight ``w``, its codes charged to ``tier`` when
    first made (and made only where they fit)."""
    for k in [k for k, e in _allowed.items() if e.ref() is None]:
        _allowed.pop(k).drop()
    _allowed[id(w)] = _Entry(weakref.ref(w), (w.data_ptr(), w._version), tier)


def holding(tiers: Iterable[Tier]) -> bool:
    """Whether any screen charged to one of ``tiers`` has its codes made."""
    return any(e.screen is not None and any(e.tier is t for t in tiers) for e in _allowed.values())


def release(tiers: Iterable[Tier]) -> None:
    """Give the codes of every screen charged to one of ``tiers`` back (a pass that does not fit
    with them comes first); each is made again at its next use where it fits."""
    for e in _allowed.values():
        if any(e.tier is t for t in tiers):
            e.drop()


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
    screened, or None where the plain kernel is to run: a weight not allowed (not resident) or
    changed since, codes that do not fit its tier, a screen switched off, features that are not
    all finite or whose magnitudes the bound does not cover (``Screen.serves``), a CPU whose head
    kernel it does not reproduce."""
    entry = _allowed.get(id(w))
    if entry is None or entry.ref() is not w or entry.off:
        return None
    if entry.key != (w.data_ptr(), w._version):   # changed in place: its codes would be stale
        entry.drop(off=True)
        return None
    mod = _serves(h, w)
    if mod is None:
        return None
    if entry.screen is None:
        if not bool(torch.isfinite(h).all()):   # (once made, ``serves`` checks the features)
            return None
        if not bool(torch.isfinite(w).all()):
            entry.off = True
            return None
        try:
            entry.tier.alloc(codes_bytes(*w.shape), "LM head screen")
        except PolicyDoesNotFitError:
            return None
        entry.screen = Screen.make(w, h)
    fits = entry.screen.serves(h)
    if fits is None:    # a weight whose sums the bound cannot cover: never screened
        entry.drop(off=True)
    if not fits:
        return None
    ids, candidates = entry.screen.argmax(mod, h, w)
    entry.strikes = entry.strikes + 1 if candidates > MAX_CANDIDATE_SHARE * h.shape[0] * w.shape[0] else 0
    if entry.strikes >= STRIKES:
        entry.drop(off=True)
    return ids
