"""The order in which (layer, micro-batch) computations of a block run.

zig-zag: each layer runs over every micro-batch of the block before the next
layer, so a layer's weights are fetched once per block (FlexGen's schedule).
row: each micro-batch runs through all layers before the next one (what
Accelerate/DeepSpeed offloading does); kept as the baseline to measure against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Step:
    layer: int
    micro_batch: int


def zigzag(num_layers: int, num_micro_batches: int) -> Iterator[Step]:
    for j in range(num_layers):
        for k in range(num_micro_batches):
            yield Step(j, k)


def row(num_layers: int, num_micro_batches: int) -> Iterator[Step]:
    for k in range(num_micro_batches):
        for j in range(num_layers):
            yield Step(j, k)


SCHEDULES: dict[str, Callable[[int, int], Iterator[Step]]] = {"zigzag": zigzag, "row": row}
