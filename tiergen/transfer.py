"""Moving tensors between host memory and the compute device.

On CUDA, host->device copies run on a dedicated load stream from pinned memory
and are ordered with events, so they overlap compute without a device-wide
synchronize. On a CPU-only machine host memory *is* the compute memory: a
"move" is the identity and crosses no link.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable

import torch


class Ready:
    """A value produced asynchronously (I/O thread and/or CUDA load stream)."""

    def __init__(self, future: Future | None = None, value: Any = None,
                 event: "torch.cuda.Event | None" = None):
        self.future, self.value, self.event = future, value, event
        self._done = future is None

    def get(self) -> Any:
        if not self._done:
            self.value, self.event = self.future.result()
            self._done = True
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            self.event = None
        return self.value


class Mover:
    def __init__(self, device: torch.device, links: Any):
        self.device = device
        self.cuda = device.type == "cuda"
        self.links = links
        self.load_stream = torch.cuda.Stream(device) if self.cuda else None
        self.store_stream = torch.cuda.Stream(device) if self.cuda else None

    def host_empty(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool = True) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=pin and self.cuda)

    def to_compute(self, host: torch.Tensor, link: str = "cpu->gpu") -> tuple[torch.Tensor, Any]:
        """(tensor on the compute device, event to wait on or None)."""
        if not self.cuda:
            return host, None
        with torch.cuda.stream(self.load_stream):
            dev = host.to(self.device, non_blocking=host.is_pinned())
            ev = torch.cuda.Event()
            ev.record(self.load_stream)
        # The compute stream will read it; keep the allocator from recycling it early.
        dev.record_stream(torch.cuda.current_stream(self.device))
        self.links.add(link, host.nbytes)
        return dev, ev

    def to_host(self, dev: torch.Tensor, out: torch.Tensor, link: str = "gpu->cpu") -> Any:
        """Copy a compute tensor into host ``out``; returns an event (None on CPU)."""
        if not self.cuda:
            if out.data_ptr() != dev.data_ptr():
                out.copy_(dev)
            return None
        ev_ready = torch.cuda.Event()
        ev_ready.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.store_stream):
            self.store_stream.wait_event(ev_ready)
            out.copy_(dev, non_blocking=out.is_pinned())
            ev = torch.cuda.Event()
            ev.record(self.store_stream)
        dev.record_stream(self.store_stream)
        self.links.add(link, dev.nbytes)
        return ev

    def run_async(self, pool: Any, fn: Callable[[], tuple[Any, Any]]) -> Ready:
        return Ready(future=pool.submit(fn))
