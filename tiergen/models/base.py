"""What every model family provides, and the per-step context it is given.

A model is three pure functions over dicts of tensors -- ``embed``, ``layer``
and ``head`` -- so the engine can place, move and schedule each layer's weights
as opaque groups without the math knowing where they live.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .. import kernels
from ..config import ModelConfig
from ..weights import prepack, screen, tiles
from ..weights.fusion import Fusion, fuse_shapes

Weights = dict[str, torch.Tensor]
# Where a checkpoint tensor goes: ("embed" | "head" | layer index, our key).
Slot = tuple[str | int, str]


@dataclass
class StepContext:
    """What one forward over one micro-batch needs besides weights and hidden states.

    positions [B,T]: position ids of the new tokens (per sequence, padding ignored);
    start: first cache column of the new tokens; mask [B,1,T,start+T] bool.
    ``extra`` holds per-step values a family precomputes once for all layers (RoPE).
    ``chunk_rows``: the token-wise parts of a layer (norms, projections, MLP) run
    over at most this many tokens at a time (None: all at once). On a CPU a
    chunk's intermediates then stay in cache instead of streaming through RAM;
    every token's result is the same either way.
    ``last_only``: only each sequence's last position goes on (a prompt's last layer, whose
    output feeds only the head): the work after attention may be done for it alone, [B,1,E] out.
    """
    positions: torch.Tensor
    start: int
    mask: torch.Tensor
    extra: dict[str, Any] = field(default_factory=dict)
    chunk_rows: int | None = None
    last_only: bool = False


class LayerKV(Protocol):
    """One layer's slice of a micro-batch's KV cache, as the model sees it."""

    def new_rows(self, start: int, num_new: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token-major views [B*num_new, Hkv, D] of the cache's own memory for the new keys and
        values at column ``start``, where it has such (None: the model makes its own). Keys
        and values written there are stored already when ``attend`` receives them."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               ctx: StepContext) -> torch.Tensor:
        """Store k/v [B,Hkv,T,D] at ctx.start, return attention of q [B,H,T,D] over the cache."""
        ...


class Model(Protocol):
    cfg: ModelConfig

    def prepare(self, ctx: StepContext) -> None: ...
    def embed(self, w: Weights, ids: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...
    def layer(self, w: Weights, x: torch.Tensor, ctx: StepContext, kv: LayerKV) -> torch.Tensor: ...
    def head_features(self, w: Weights, x: torch.Tensor) -> torch.Tensor:
        """The final hidden state as the LM head's projection ``w["lm_head"]`` takes it."""
        ...
    def slot(self, hf_name: str) -> Slot | None: ...
    def checkpoint_shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        """Every group's tensors as a checkpoint holds them (the keys ``slot`` returns)."""
        ...
    def shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        """Every group's tensors as stored and computed with: the checkpoint's, with each
        layer's ``fusion`` applied (weights/fusion.py)."""
        ...
    fusion: Fusion


class Family:
    """What the families share: stored shapes derive from the checkpoint's and ``fusion``."""
    fusion: Fusion = {}

    def checkpoint_shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        raise NotImplementedError

    def shapes(self) -> dict[str | int, dict[str, tuple[int, ...]]]:
        return {g: fuse_shapes(s, self.fusion) if isinstance(g, int) else s
                for g, s in self.checkpoint_shapes().items()}


def linear(x: torch.Tensor, w: Any, b: torch.Tensor | None = None) -> torch.Tensor:
    fast = tiles.kernel_for(x, w)
    if fast is not None:   # bfloat16 products on AMX or AVX-512 BF16 (weights/tiles.py)
        return tiles.product(fast, x, w, b)
    w = tiles.plain(w)
    # a resident CPU weight packed at load, or a plain one at a dtype oneDNN packs: the same
    # oneDNN call for both, so streamed and resident layers agree (weights/prepack.py)
    if w.is_mkldnn or prepack.fuses(x, w):
        return prepack.packed_linear(x, w, b)
    return torch.nn.functional.linear(x, w, b)


def linear_act(x: torch.Tensor, w: Any, b: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(linear(x, w, b)); on the CPU the activation is applied before the product is rounded."""
    fast = tiles.kernel_for(x, w)
    if fast is not None:
        return ACTIVATIONS[act](tiles.product(fast, x, w, b, out_float=True)).to(x.dtype)
    w = tiles.plain(w)
    if act in prepack.FUSED_ACTIVATIONS and prepack.fuses(x, w):
        return prepack.linear_act(x, w, b, act)
    return ACTIVATIONS[act](linear(x, w, b))


def linear_gated(x: torch.Tensor, w: Any, b: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(g) * u for (g | u) = linear(x, w, b): a gated MLP's gate and up products as one,
    over their stacked matrix (weights/fusion.py); one wide product runs faster than two
    narrow ones. At half precision act(g) * u is computed in float32 and rounded once; on the
    AMX tile kernel g and u are not rounded at all before it (BENCHMARKS.md §6)."""
    fast = tiles.kernel_for(x, w)
    if fast is not None and act == "silu" and tiles.gated_fits(w):
        return tiles.product(fast, x, w, b, gated=True)
    gu = linear(x, w, b)
    fast = kernels.for_bf16("rowwise", gu) if act == "silu" and gu.dim() == 2 else None
    if fast is not None:   # activation and product in one pass (tiergen/kernels/rowwise.cpp)
        return fast.silu_mul(gu)
    g, u = gu.chunk(2, -1)
    if gu.dtype == torch.float32:
        return ACTIVATIONS[act](g).mul_(u)
    return ACTIVATIONS[act](g.float()).mul_(u.float()).to(gu.dtype)


def linear_add(x: torch.Tensor, w: Any, b: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    """other + linear(x, w, b) (a residual), fused into the product where oneDNN or the tile kernel runs it."""
    fast = tiles.kernel_for(x, w)
    if fast is not None and other.dtype == x.dtype:
        return tiles.product(fast, x, w, b, other=other)
    w = tiles.plain(w)
    if prepack.fuses(x, w):
        return prepack.linear_binary(x, other, w, b, "add")
    return other + linear(x, w, b)


# The greedy head's vocabulary slice on a CPU: at 256 rows its bf16 logits take 4 MiB,
# so a slice stays in cache while its maximum is taken, and the weight is read once a step.
HEAD_SLICE_ROWS = 8192


def head(model: Model, w: Weights, x: torch.Tensor) -> torch.Tensor:
    """Logits over the vocabulary: the family's final features, then the vocab projection."""
    return _vocab_logits(model.head_features(w, x), w["lm_head"])


def head_kernel(h: torch.Tensor, weight: Any):
    """The head kernel (AMX: kernels/lm_head.cpp, else AVX-512 BF16: lm_head_avx512.cpp) where
    one serves these tensors, else None: float32 logits of bfloat16 features from the weight's
    plain rows, resident or streamed."""
    if not isinstance(weight, torch.Tensor) or weight.is_mkldnn or weight.dim() != 2 or h.numel() == 0:
        return None
    if all(t.is_cpu and t.dtype == torch.bfloat16 and t.stride(-1) == 1 for t in (h, weight)):
        return kernels.head_kernel()
    return None


def _vocab_logits(h: torch.Tensor, weight: Any) -> torch.Tensor:
    fast = head_kernel(h, weight)
    if fast is not None:   # float32 logits: no ties made by bfloat16 rounding alone
        return fast.logits(h.reshape(-1, h.shape[-1]), weight).view(*h.shape[:-1], weight.shape[0])
    if isinstance(weight, prepack.PackedRows):
        return torch.cat([linear(h, part) for _, part in weight.slices()], -1)
    return linear(h, weight)


def greedy_head(model: Model, w: Weights, x: torch.Tensor, slice_rows: int | None = None) -> torch.Tensor:
    """argmax of ``head(model, w, x)`` per row, on x's device.

    Where a head kernel serves (bfloat16 on a CPU with AMX or AVX-512 BF16) the argmax is of float32
    logits, not of their bfloat16 rounding. Otherwise, with ``slice_rows`` the projection
    runs over slices of that many vocabulary ids,
    keeping each row's running best: the [B,V] logits never exist, the weight is read
    once, and each slice stays in cache. Ties go to the lowest id, as argmax does.
    """
    h = model.head_features(w, x)
    fast = head_kernel(h, w["lm_head"])
    if fast is not None:   # the argmax of float32 logits, taken tile by tile (no [B,V] logits)
        ids = screen.greedy(h, w["lm_head"])   # the same ids, most logits only estimated in int8
        return fast.argmax(h, w["lm_head"]) if ids is None else ids
    if slice_rows is None:
        return _vocab_logits(h, w["lm_head"]).argmax(-1)
    slices = prepack.row_slices(w["lm_head"], slice_rows)
    fast = kernels.for_bf16("rowwise", h)
    if fast is not None:   # each slice's max and first index in one pass (tiergen/kernels/rowwise.cpp)
        best = torch.empty(h.shape[0], dtype=torch.float32)
        arg = torch.empty(h.shape[0], dtype=torch.long)
        for i, (c0, part) in enumerate(slices):
            fast.argmax_update(linear(h, part), best, arg, c0, i == 0)
        return arg
    _, first = next(slices)
    best, arg = linear(h, first).max(-1)
    for c0, part in slices:
        logits = linear(h, part)
        # A max without indices is ~3x cheaper; only the rows this slice beats need its
        # argmax, and in natural text few do after the first slices (frequent ids come first).
        rows = (logits.amax(-1) > best).nonzero()[:, 0]
        if rows.numel():
            val, idx = logits.index_select(0, rows).max(-1)
            best[rows], arg[rows] = val, idx + c0
    return arg


def rows_after_attention(o: torch.Tensor, x: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Attention's output o [B,T,H,D] and the layer's input x [B,T,E] as rows [B*T', .] for the
    token-wise work after attention, and T': every position, or with ``ctx.last_only`` each
    sequence's last (a prompt's last layer skips the output projection and MLP of the rest)."""
    if ctx.last_only:
        o, x = o[:, -1:], x[:, -1:]
    B, T = o.shape[:2]
    return o.reshape(B * T, -1), x.reshape(B * T, -1), T


def row_chunks(n: int, chunk: int | None) -> list[slice]:
    """Slices covering rows [0, n) in pieces of at most ``chunk`` rows."""
    if not chunk or n <= chunk:
        return [slice(0, n)]
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]


def join_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Rows computed chunk by chunk, as one tensor (no copy for a single chunk)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "relu": torch.relu,
    "gelu": torch.nn.functional.gelu,
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


def activation(name: str) -> str:
    """The activation's name, checked: ``linear_act`` takes it."""
    from ..errors import UnknownModelError
    if name not in ACTIVATIONS:
        raise UnknownModelError(f"unsupported activation {name!r}")
    return name


class NameMap:
    """Maps checkpoint tensor names to slots with a few regex rules."""

    def __init__(self, rules: list[tuple[str, str | int, str]]):
        # rule: (regex with optional (?P<i>\d+), group or "layer", our key)
        self.rules = [(re.compile(p), g, k) for p, g, k in rules]

    def __call__(self, name: str) -> Slot | None:
        for pat, group, key in self.rules:
            m = pat.fullmatch(name)
            if m:
                return (int(m.group("i")) if group == "layer" else group, key)
        return None


MODELS: dict[str, Callable[[ModelConfig], Model]] = {}


def register(family: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        MODELS[family] = cls
        return cls
    return deco


def get_model(cfg: ModelConfig) -> Model:
    from . import llama, opt  # noqa: F401  (registration side effect)
    return MODELS[cfg.family](cfg)
