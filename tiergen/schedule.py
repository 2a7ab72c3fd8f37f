"""The schedule: one forward pass over a block as an explicit list of steps.

The compute order is either
  zigzag: each layer over every micro-batch of the block before the next layer,
          so a layer's weights cross the slow link once per block (FlexGen), or
  row:    each micro-batch through all layers before the next one (what
          Accelerate/DeepSpeed offloading does), kept as the baseline.
Loads are placed around the computes: with overlap, the next layer's weights
are requested when the current layer starts and each micro-batch's cache
CACHE_LOOKAHEAD computes ahead, so I/O runs while the current step computes; without
overlap each load sits right before the compute that needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


# With overlap, a micro-batch's cache is requested this many computes before it is needed:
# one ahead left a disk-homed cache's reads queued behind the next layer's weights, and
# decode waited for them (OPT-1.3B 48x4: 0.85 s of a 2.5 s step).
CACHE_LOOKAHEAD = 4


@dataclass(frozen=True)
class Step:
    op: str              # load_weight | load_cache | compute | release_weight
    layer: int
    micro_batch: int = -1


def zigzag(num_layers: int, num_micro_batches: int) -> Iterator[Step]:
    for j in range(num_layers):
        for k in range(num_micro_batches):
            yield Step("compute", j, k)


def row(num_layers: int, num_micro_batches: int) -> Iterator[Step]:
    for k in range(num_micro_batches):
        for j in range(num_layers):
            yield Step("compute", j, k)


SCHEDULES: dict[str, Callable[[int, int], Iterator[Step]]] = {"zigzag": zigzag, "row": row}


def plan(schedule: str, num_layers: int, num_micro_batches: int, overlap: bool) -> list[Step]:
    order = list(SCHEDULES[schedule](num_layers, num_micro_batches))
    # runs: maximal stretches of consecutive computes on one layer (one weight fetch each)
    run_start = [i == 0 or order[i - 1].layer != s.layer for i, s in enumerate(order)]
    run_end = [i + 1 == len(order) or order[i + 1].layer != s.layer for i, s in enumerate(order)]
    next_run = [None] * len(order)
    nxt = None
    for i in range(len(order) - 1, -1, -1):
        next_run[i] = nxt
        if run_start[i]:
            nxt = order[i].layer
    steps: list[Step] = []
    if overlap and order:
        steps.append(Step("load_weight", order[0].layer))
        steps += [Step("load_cache", c.layer, c.micro_batch) for c in order[:CACHE_LOOKAHEAD]]
    for i, s in enumerate(order):
        if overlap:
            if run_start[i] and next_run[i] is not None:
                steps.append(Step("load_weight", next_run[i]))
            if i + CACHE_LOOKAHEAD < len(order):
                c = order[i + CACHE_LOOKAHEAD]
                steps.append(Step("load_cache", c.layer, c.micro_batch))
        else:
            if run_start[i]:
                steps.append(Step("load_weight", s.layer))
            steps.append(Step("load_cache", s.layer, s.micro_batch))
        steps.append(s)
        if run_end[i]:
            steps.append(Step("release_weight", s.layer))
    return steps
