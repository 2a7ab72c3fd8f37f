"""Checkpoint tensors a family multiplies as one matrix, stacked at load.

A family's ``fusion`` maps a stored key to the checkpoint tensors stacked along
rows to make it, e.g. ``w_qkv`` <- (``wq``, ``wk``, ``wv``): one product over the
stacked matrix instead of several narrow ones (SmolLM2's K and V projections are
192 wide, where a CPU matmul runs at half its rate). Every placement stores and
streams the stacked matrix, so resident and offloaded layers compute the same bits.
"""
from __future__ import annotations

from typing import Iterator

import torch

from ..errors import CheckpointError

Fusion = dict[str, tuple[str, ...]]
Shapes = dict[str, tuple[int, ...]]
Slot = tuple[str | int, str]


def fuse_shapes(parts: Shapes, fusion: Fusion) -> Shapes:
    """A layer's stored shapes: each complete set of parts replaced, where its first part
    stood, by one matrix with their rows. A fusion whose parts are all absent (a bias the
    config has not) is skipped."""
    part_of = {p: key for key, ps in fusion.items() for p in ps}
    out: Shapes = {}
    for k, s in parts.items():
        key = part_of.get(k)
        if key is None:
            out[k] = s
            continue
        present = [p for p in fusion[key] if p in parts]
        if len(present) != len(fusion[key]) or len({parts[p][1:] for p in present}) != 1:
            raise ValueError(f"fusion {key!r}: parts {fusion[key]} must all exist with equal trailing shapes")
        if key not in out:
            out[key] = (sum(parts[p][0] for p in present),) + tuple(s[1:])
    return out


def group_label(g: str | int) -> str:
    """A weight group as messages name it: "layer 3", "embed", "head"."""
    return f"layer {g}" if isinstance(g, int) else g


def fuse_tensors(tensors: Iterator[tuple[Slot, torch.Tensor]], fusion: Fusion,
                 part_shapes: dict[str | int, Shapes], description: str) -> Iterator[tuple[Slot, torch.Tensor]]:
    """The checkpoint's tensors as stored: layer parts are held back until the last one of
    their matrix arrives, then yielded stacked. Parts are checked against their own shapes,
    so a wrong or missing tensor is named as the checkpoint names it."""
    part_of = {p: key for key, ps in fusion.items() for p in ps}
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for (g, k), t in tensors:
        key = part_of.get(k) if isinstance(g, int) else None
        if key is None or k not in part_shapes.get(g, {}):
            yield (g, k), t
            continue
        if tuple(t.shape) != tuple(part_shapes[g][k]):
            raise CheckpointError(f"{description}: weight {k!r} of {group_label(g)} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(part_shapes[g][k])}")
        got = pending.setdefault((g, key), {})
        got[k] = t
        if len(got) == len(fusion[key]):
            del pending[(g, key)]
            yield (g, key), torch.cat([got[p] for p in fusion[key]])
    for (g, key), got in pending.items():
        missing = next(p for p in fusion[key] if p not in got)
        raise CheckpointError(f"{description}: missing weight {missing!r} of {group_label(g)}")
