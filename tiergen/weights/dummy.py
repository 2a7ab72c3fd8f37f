"""Random weights of a known shape, generated lazily one group at a time.

Each group (embed, every layer, head) has its own seed derived from the model
seed, so group j can be regenerated alone: a 175B dummy model exists without
ever holding more than one layer.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..models.base import Model, Slot


def _group_seed(seed: int, g: str | int) -> int:
    code = {"embed": -1, "head": -2}.get(g, g)  # type: ignore[arg-type]
    return (seed * 7919 + int(code) * 104729) % (2**62)


def dummy_group(model: Model, g: str | int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(_group_seed(seed, g))
    out = {}
    for key, shape in model.checkpoint_shapes()[g].items():
        if len(shape) == 1:
            # Norm gains near 1, biases near 0: keeps activations in a sane range.
            base = 1.0 if ("norm" in key or key.startswith("ln")) and not key.endswith("_b") else 0.0
            t = base + 0.02 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * (shape[-1] ** -0.5)
        out[key] = t.to(dtype)
    return out


def iter_dummy(model: Model, seed: int, dtype: torch.dtype) -> Iterator[tuple[Slot, torch.Tensor]]:
    for g in model.checkpoint_shapes():
        for key, t in dummy_group(model, g, seed, dtype).items():
            yield (g, key), t
