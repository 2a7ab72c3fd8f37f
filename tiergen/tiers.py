"""The three memory tiers, their byte budgets and accounting.

On a CPU-only machine the "gpu" tier is the compute device's own budget in host
RAM, so the same policies run everywhere; the host then holds both budgets.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field

import torch

from .errors import InvalidRequestError, PolicyDoesNotFitError

TIERS = ("gpu", "cpu", "disk")


def _cgroup_limit() -> int | None:
    """Memory limit of this process's cgroup (v2 or v1), if any."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            cand = [f"/sys/fs/cgroup{path}/memory.max"]
        elif "memory" in controllers.split(","):
            cand = [f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"]
        else:
            continue
        for c in cand:
            try:
                v = open(c).read().strip()
                usage_file = c.replace("memory.max", "memory.current").replace("limit_in_bytes", "usage_in_bytes")
                usage = int(open(usage_file).read().strip())
                if v != "max" and int(v) < 1 << 60:
                    return max(0, int(v) - usage)
            except (OSError, ValueError):
                pass
    return None


def host_available_bytes() -> int:
    """Free host RAM: MemAvailable, or what the cgroup still allows if smaller."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def _existing_parent(path: str) -> str:
    """The path itself, or its nearest existing ancestor (the offload dir is made later)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def parse_bytes(text: str | int | float | None) -> int | None:
    """'16GiB', '2G', '500MB', '1e9' or a number of bytes: a finite size of 0 or more."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        n = float(text)
    else:
        s = text.strip().lower().replace(" ", "")
        units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
                 "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "b": 1}
        unit, mul = next(((u, m) for u, m in units.items() if s.endswith(u)), ("", 1))
        try:
            n = float(s[: len(s) - len(unit)]) * mul
        except ValueError:
            raise InvalidRequestError(f"bad memory size {text!r} (e.g. 16GiB, 500MB, 1e9)") from None
    if not math.isfinite(n) or n < 0:
        raise InvalidRequestError(f"bad memory size {text!r}: a finite size of 0 bytes or more")
    return int(n)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n}"


@dataclass
class Tier:
    name: str
    budget: int
    current: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def alloc(self, n: int, what: str = "") -> None:
        with self.lock:
            if self.current + n > self.budget:
                raise PolicyDoesNotFitError(
                    f"{self.name} tier over budget by {self.current + n - self.budget} bytes "
                    f"allocating {what or 'a buffer'} ({fmt_bytes(n)}; budget {fmt_bytes(self.budget)})")
            self.current += n
            self.peak = max(self.peak, self.current)

    def free(self, n: int) -> None:
        with self.lock:
            self.current -= n


class Tiers:
    """Budgets and accounting for gpu / cpu / disk plus the bytes moved per link."""

    def __init__(self, device: torch.device, gpu_mem: int | None = None, cpu_mem: int | None = None,
                 disk: int | None = None, offload_dir: str | None = None):
        from .disk import LinkCounter
        self.device = device
        host = host_available_bytes()
        if gpu_mem is None:
            gpu_mem = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host
        if cpu_mem is None:
            cpu_mem = host
        if disk is None:
            disk = shutil.disk_usage(_existing_parent(offload_dir or tempfile.gettempdir())).free
        self.gpu, self.cpu, self.disk = Tier("gpu", gpu_mem), Tier("cpu", cpu_mem), Tier("disk", disk)
        # Without a GPU both "gpu" and "cpu" budgets are carved from the same RAM.
        self.shared_host = device.type != "cuda"
        self.host_limit = host
        self.links = LinkCounter()

    def __getitem__(self, name: str) -> Tier:
        return {"gpu": self.gpu, "cpu": self.cpu, "disk": self.disk}[name]

    def check_fits(self, demand: dict[str, dict[str, int]]) -> None:
        """Refuse a plan (tier -> what -> bytes) that exceeds a budget, before any allocation."""
        for name in TIERS:
            need = sum(demand.get(name, {}).values())
            budget = self[name].budget - self[name].current
            if need > budget:
                parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in demand[name].items() if v)
                raise PolicyDoesNotFitError(
                    f"policy does not fit: the {name} tier needs {fmt_bytes(need)} ({parts}) but has "
                    f"{fmt_bytes(budget)} free; over by {need - budget} bytes")
        if self.shared_host:
            need, have = self._shared_host(demand)
            if need > have:
                raise PolicyDoesNotFitError(
                    f"policy does not fit: with no GPU the gpu and cpu tiers share host RAM; they need "
                    f"{fmt_bytes(need)} but {fmt_bytes(have)} is available; over by {need - have} bytes")

    def _shared_host(self, demand: dict[str, dict[str, int]]) -> tuple[int, int]:
        """(bytes ``demand`` asks of the gpu and cpu tiers together, host RAM they have left):
        without a GPU both are carved from the same RAM."""
        need = sum(sum(demand.get(n, {}).values()) for n in ("gpu", "cpu"))
        return need, self.host_limit - self.gpu.current - self.cpu.current

    def host_headroom(self, demand: dict[str, dict[str, int]]) -> int:
        """Bytes of the compute tier (host RAM without a GPU) left over once ``demand`` is placed."""
        free = self.gpu.budget - self.gpu.current - sum(demand.get("gpu", {}).values())
        if self.shared_host:
            need, have = self._shared_host(demand)
            free = min(free, have - need)
        return max(0, free)

    def report(self) -> dict[str, dict[str, int]]:
        tiers = {t.name: {"budget": t.budget, "current": t.current, "peak": t.peak}
                 for t in (self.gpu, self.cpu, self.disk)}
        return {"tiers": tiers, "links": self.links.snapshot()}

    def reset_peaks(self) -> None:
        for t in (self.gpu, self.cpu, self.disk):
            with t.lock:
                t.peak = t.current
        self.links.reset()
