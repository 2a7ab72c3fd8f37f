"""Weights held resident on the compute device, loaded tensor by tensor."""
from __future__ import annotations

import torch

from ..errors import CheckpointError
from ..models.base import Model, Weights
from .source import ModelSource


def check_shapes(model: Model, groups: dict[str | int, Weights], what: str) -> None:
    """Every expected tensor present with the expected shape, or a CheckpointError."""
    for g, expected in model.shapes().items():
        got = groups.get(g, {})
        for key, shape in expected.items():
            if key not in got:
                where = f"layer {g}" if isinstance(g, int) else g
                raise CheckpointError(f"{what}: missing weight {key!r} of {where}")
            if tuple(got[key].shape) != tuple(shape):
                raise CheckpointError(f"{what}: weight {key!r} of {g} has shape "
                                      f"{tuple(got[key].shape)}, expected {tuple(shape)}")


class ResidentWeights:
    """All weight groups on one device (the fully resident baseline every policy must match)."""

    def __init__(self, source: ModelSource, model: Model, dtype: torch.dtype, device: torch.device):
        groups: dict[str | int, Weights] = {g: {} for g in model.shapes()}
        for (g, key), t in source.tensors(model, dtype):
            if g in groups:
                groups[g][key] = t.to(device)
        check_shapes(model, groups, source.description)
        if "lm_head" not in groups["head"]:
            groups["head"]["lm_head"] = groups["embed"]["tok"]  # tied embeddings
        self.groups = groups

    def group(self, g: str | int) -> Weights:
        return self.groups[g]

    def nbytes(self) -> int:
        seen, total = set(), 0
        for w in self.groups.values():
            for t in w.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.nbytes
        return total
