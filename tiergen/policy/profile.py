"""Hardware profile: what the cost model needs to know about a machine.

A ``HardwareProfile`` is a frozen record of capacities (bytes per tier), link
bandwidths (host<->device both ways, pinned and pageable; disk read and write
through the engine's own O_DIRECT path), compute rates (matmul FLOP/s over a
grid of row counts and weight sizes, per dtype and device; attention and
elementwise rates; per-op dispatch overhead; dequantize rate) and how much
disk I/O and compute slow each other down when they overlap on a machine
with few cores.

``measure_profile()`` measures this machine; ``load_profile`` / ``save_profile``
read and write the JSON form, which can also be written by hand to plan for a
machine you do not have (``t4_paper_profile()`` builds the FlexGen paper's
T4 box). ``cached_profile()`` measures once and keeps the result under the
user cache dir.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import TiergenError

VERSION = 1
# Row counts and weight sizes (elements of one [out, in] matrix) of the matmul grid:
# decode rows are the micro-batch, prefill rows are micro-batch x prompt length.
GRID_ROWS = (1, 8, 32, 128, 512, 2048)
GRID_SHAPES = ((576, 576), (1536, 576), (2048, 2048), (8192, 2048))


class ProfileError(TiergenError):
    """A profile file that is missing, unreadable or malformed."""


@dataclass(frozen=True)
class MatmulTable:
    """FLOP/s of ``x[rows, in] @ w[in, out]`` measured on a grid; read in log-log space."""
    rows: tuple[int, ...]
    sizes: tuple[int, ...]                     # out * in of the weight
    flops: tuple[tuple[float, ...], ...]       # [len(rows)][len(sizes)]

    def __post_init__(self) -> None:
        if not self.rows or not self.sizes or len(self.flops) != len(self.rows) or \
                any(len(r) != len(self.sizes) for r in self.flops):
            raise ProfileError("matmul table: flops must be a rows x sizes grid")
        if any(not (v > 0) for r in self.flops for v in r):
            raise ProfileError("matmul table: every rate must be > 0")

    def rate(self, rows: float, size: float) -> float:
        """FLOP/s at ``rows`` x ``size``, bilinear in log space, clamped to the grid's edges."""
        i, fi = _bracket(self.rows, rows)
        j, fj = _bracket(self.sizes, size)
        f = self.flops
        lg = [[math.log(f[a][b]) for b in (j, min(j + 1, len(self.sizes) - 1))]
              for a in (i, min(i + 1, len(self.rows) - 1))]
        top = lg[0][0] * (1 - fj) + lg[0][1] * fj
        bot = lg[1][0] * (1 - fj) + lg[1][1] * fj
        return math.exp(top * (1 - fi) + bot * fi)

    def scaled(self, k: float) -> "MatmulTable":
        return replace(self, flops=tuple(tuple(v * k for v in r) for r in self.flops))


def _bracket(grid: tuple[int, ...], x: float) -> tuple[int, float]:
    """Index of the grid point at or below x and the log-space fraction toward the next."""
    x = max(float(x), 1e-9)
    if x <= grid[0] or len(grid) == 1:
        return 0, 0.0
    for i in range(len(grid) - 1):
        if x <= grid[i + 1]:
            return i, math.log(x / grid[i]) / math.log(grid[i + 1] / grid[i])
    return len(grid) - 1, 0.0


@dataclass(frozen=True)
class DeviceRates:
    """Compute rates of one device (the compute device, or the host CPU beside it)."""
    matmul: dict[str, MatmulTable]   # dtype name -> table
    attn_decode_Bps: float           # KV-cache bytes scanned per second by decode attention
    attn_prefill_flops: float        # FLOP/s of prefill attention (QK^T and PV)
    elementwise_Bps: float           # bytes/s through norms, activations, residual adds
    op_overhead_s: float             # fixed cost of launching one op (Python + dispatch)
    dequant_Bps: float               # dense output bytes/s of dequantize()
    # seconds of one decode layer call at a tiny size, per model family: the ops'
    # dispatch cost, which dominates small models at small batches
    layer_overhead_s: dict[str, float] = field(default_factory=dict)

    def matmul_rate(self, dtype: str, rows: float, size: float) -> float:
        table = self.matmul.get(dtype) or next(iter(self.matmul.values()))
        return table.rate(rows, size)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    device: str                      # "cuda" | "cpu": what computes
    gpu_mem: int                     # compute-device memory (host RAM when device is cpu)
    cpu_mem: int                     # host RAM
    disk: int                        # offload-dir free space
    disk_read_Bps: float             # O_DIRECT reads through DiskFile + IOPool
    disk_write_Bps: float
    compute: DeviceRates             # the compute device
    host: DeviceRates                # the host CPU (== compute on a CPU-only machine)
    h2d_pinned_Bps: float = math.inf   # host -> device; inf: no link (CPU-only)
    h2d_pageable_Bps: float = math.inf
    d2h_pinned_Bps: float = math.inf
    d2h_pageable_Bps: float = math.inf
    # Overlap on few cores: compute runs io_slows_compute x slower while disk I/O is
    # in flight, and disk I/O compute_slows_io x slower while compute runs (1 = free).
    io_slows_compute: float = 1.0
    compute_slows_io: float = 1.0
    notes: str = ""
    measured_at: str = ""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ProfileError(f"profile device must be 'cpu' or 'cuda', got {self.device!r}")
        for f in ("gpu_mem", "cpu_mem", "disk", "disk_read_Bps", "disk_write_Bps", "h2d_pinned_Bps",
                  "h2d_pageable_Bps", "d2h_pinned_Bps", "d2h_pageable_Bps"):
            if not getattr(self, f) > 0:
                raise ProfileError(f"profile field {f} must be > 0, got {getattr(self, f)!r}")
        if self.io_slows_compute < 1 or self.compute_slows_io < 1:
            raise ProfileError("io_slows_compute and compute_slows_io must be >= 1")
        if 1 / self.io_slows_compute + 1 / self.compute_slows_io < 1:
            # worse than running the two one after the other: clamp to serial
            object.__setattr__(self, "compute_slows_io",
                               1 / (1 - 1 / self.io_slows_compute) if self.io_slows_compute > 1 else 1.0)

    @property
    def shared_host(self) -> bool:
        """No GPU: the gpu and cpu tiers are the same RAM."""
        return self.device != "cuda"

    def h2d(self, pinned: bool = True) -> float:
        return self.h2d_pinned_Bps if pinned else self.h2d_pageable_Bps

    def d2h(self, pinned: bool = True) -> float:
        return self.d2h_pinned_Bps if pinned else self.d2h_pageable_Bps

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = VERSION
        return _jsonable(d)


# ---------------------------------------------------------------- JSON

def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _num(v: Any, what: str) -> float:
    if v == "inf":
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ProfileError(f"profile field {what} must be a number, got {v!r}")
    return float(v)


def _table(d: Any, what: str) -> MatmulTable:
    try:
        return MatmulTable(rows=tuple(int(r) for r in d["rows"]), sizes=tuple(int(s) for s in d["sizes"]),
                           flops=tuple(tuple(_num(v, what) for v in row) for row in d["flops"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"profile field {what} is malformed ({e.__class__.__name__}: {e})") from None


def _rates(d: Any, what: str) -> DeviceRates:
    if not isinstance(d, dict):
        raise ProfileError(f"profile field {what} must be an object")
    try:
        over = d.get("layer_overhead_s", {})
        if not isinstance(over, dict):
            raise ProfileError(f"profile field {what}.layer_overhead_s must be an object")
        return DeviceRates(matmul={k: _table(v, f"{what}.matmul.{k}") for k, v in d["matmul"].items()},
                           layer_overhead_s={k: _num(v, f"{what}.layer_overhead_s.{k}") for k, v in over.items()},
                           **{f.name: _num(d[f.name], f"{what}.{f.name}")
                              for f in fields(DeviceRates) if f.name not in ("matmul", "layer_overhead_s")})
    except KeyError as e:
        raise ProfileError(f"profile field {what} lacks {e.args[0]!r}") from None
    except AttributeError:
        raise ProfileError(f"profile field {what}.matmul must be an object") from None


def profile_from_dict(d: Any) -> HardwareProfile:
    if not isinstance(d, dict):
        raise ProfileError("a profile must be a JSON object")
    kw: dict[str, Any] = {}
    for f in fields(HardwareProfile):
        if f.name not in d:
            if f.default is not MISSING:
                continue
            raise ProfileError(f"profile lacks the field {f.name!r}")
        v = d[f.name]
        if f.name in ("compute", "host"):
            kw[f.name] = _rates(v, f.name)
        elif f.name in ("name", "device", "notes", "measured_at"):
            kw[f.name] = str(v)
        elif f.name in ("gpu_mem", "cpu_mem", "disk"):
            kw[f.name] = int(_num(v, f.name))
        else:
            kw[f.name] = _num(v, f.name)
    return HardwareProfile(**kw)


def load_profile(path: str | os.PathLike[str]) -> HardwareProfile:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ProfileError(f"no such profile file: {path}") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProfileError(f"profile {path} is not valid JSON: {e}") from None
    try:
        return profile_from_dict(data)
    except ProfileError as e:
        raise ProfileError(f"profile {path}: {e}") from None


class ProfileSaveError(TiergenError):
    """A measured profile that could not be written; ``profile`` holds it, so it is not lost."""

    def __init__(self, message: str, profile: HardwareProfile) -> None:
        super().__init__(message)
        self.profile = profile


def save_profile(p: HardwareProfile, path: str | os.PathLike[str]) -> None:
    """Written whole or not at all: a temporary file renamed over ``path``."""
    tmp = Path(f"{path}.tmp{os.getpid()}")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(p.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ProfileSaveError(f"cannot write the profile to {path}: {e.strerror or e}", p) from None


def default_profile_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tiergen" / f"profile-{socket.gethostname()}.json"


def cached_profile(refresh: bool = False, path: str | os.PathLike[str] | None = None,
                   device: str | None = None, offload_dir: str | None = None,
                   log: Callable[[str], None] | None = None, must_save: bool = False) -> HardwareProfile:
    """The machine's profile from the cache, measured (and cached) if absent or ``refresh``.
    A cache that cannot be written only costs the next run a measurement (a warning to
    ``log``), unless ``must_save``: then ProfileSaveError, which carries the profile."""
    path = Path(path) if path else default_profile_path()
    if path.is_file() and not refresh:
        p = load_profile(path)
        if device is None or p.device == device:
            return p
    p = measure_profile(device=device, offload_dir=offload_dir, log=log)
    try:
        save_profile(p, path)
    except ProfileSaveError as e:
        if must_save:
            raise
        if log:
            log(f"warning: {e}; it will be measured again next time")
    return p


# ---------------------------------------------------------------- measuring

def _timeit(fn: Callable[[], Any], min_s: float = 0.12, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds per call: one warm-up, then repeat until ``min_s`` has passed (best of two rounds)."""
    fn()
    sync()
    best = math.inf
    for _ in range(2):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        best = min(best, dt / n)
    return best


# The matmul grid is timed on weights that are not in any cache, as the engine meets
# them: a pass streams every layer's weights through memory, far more than the last
# level cache holds. Each call takes the next of enough copies of the weight to fill
# COLD_SET_FACTOR x that cache (at most COLD_SET_MAX bytes). Timing one weight over and
# over keeps it in cache (L3 is hundreds of MiB on server CPUs) and overstates the
# memory-bound rates of decode's few rows.
COLD_SET_FACTOR = 2
COLD_SET_MAX = 1 << 30


def _last_level_cache(device: torch.device) -> int:
    """Bytes of the device's last level cache (sysfs on the host, L2 on a GPU); 32 MiB if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 32 << 20)
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            t = f.read_text().strip().upper()
            best = max(best, int(t.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(t[-1:], 0))
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def _matmul_table(device: torch.device, dtype: torch.dtype, sync: Callable[[], None]) -> MatmulTable:
    cold = min(COLD_SET_FACTOR * _last_level_cache(device), COLD_SET_MAX)
    flops: list[list[float]] = [[] for _ in GRID_ROWS]
    for out_f, in_f in GRID_SHAPES:
        w0 = torch.randn(out_f, in_f, device=device).to(dtype) * 0.02
        ws = [w0] + [w0.clone() for _ in range(max(1, -(-cold // w0.nbytes)) - 1)]
        nxt = [0]

        def call(x: torch.Tensor) -> torch.Tensor:
            nxt[0] = (nxt[0] + 1) % len(ws)
            return torch.nn.functional.linear(x, ws[nxt[0]])

        for i, rows in enumerate(GRID_ROWS):
            x = torch.randn(rows, in_f, device=device).to(dtype)
            s = _timeit(lambda: call(x), min_s=0.06, sync=sync)
            flops[i].append(2.0 * rows * in_f * out_f / s)
        del ws, w0
    return MatmulTable(GRID_ROWS, tuple(o * i for o, i in GRID_SHAPES), tuple(tuple(r) for r in flops))


def _device_rates(device: torch.device, dtypes: tuple[torch.dtype, ...],
                  log: Callable[[str], None]) -> DeviceRates:
    from ..models.attention import attention
    from ..quant import WEIGHT_QUANT, dequantize, quantize
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    work_dtype = dtypes[0]
    tables = {}
    for dt in dtypes:
        log(f"matmul {str(dt).removeprefix('torch.')} on {device}")
        tables[str(dt).removeprefix("torch.")] = _matmul_table(device, dt, sync)
    # decode attention: one query per row over a cache; bound by reading the cache
    B, H, S, D = 16, 8, 512, 64
    q = torch.randn(B, H, 1, D, device=device).to(work_dtype)
    k = torch.randn(B, H, S, D, device=device).to(work_dtype)
    v = torch.randn(B, H, S, D, device=device).to(work_dtype)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=device)
    s = _timeit(lambda: attention(q, k, v, mask), sync=sync)
    attn_decode = (k.nbytes + v.nbytes) / s
    # prefill attention: T queries over T keys
    B, T = 4, 256
    q = torch.randn(B, H, T, D, device=device).to(work_dtype)
    kv = torch.randn(B, H, T, D, device=device).to(work_dtype)
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None].expand(B, 1, T, T)
    s = _timeit(lambda: attention(q, kv, kv, mask), sync=sync)
    attn_prefill = 4.0 * B * H * T * T * D / s
    # elementwise: a residual add on a large activation (read two, write one)
    a = torch.randn(64, 1 << 16, device=device).to(work_dtype)
    b = torch.randn_like(a)
    s = _timeit(lambda: a + b, sync=sync)
    elementwise = 3 * a.nbytes / s
    # dispatch overhead: a tiny op, where the arithmetic is nothing
    t = torch.ones(4, device=device)
    s = _timeit(lambda: t.mul(1.0001), sync=sync)
    overhead = s
    # dequantize a weight-sized tensor with the engine's own quantizer
    w = torch.randn(1024, 2048, device=device).to(work_dtype)
    qw = quantize(w, WEIGHT_QUANT)
    s = _timeit(lambda: dequantize(qw), sync=sync)
    dequant = w.nbytes / s
    layer = {fam: _layer_overhead(fam, device, work_dtype, sync) for fam in ("llama", "opt")}
    return DeviceRates(tables, attn_decode, attn_prefill, elementwise, overhead, dequant, layer)


class _PlainKV:
    """A KV cache with nothing tiered: what a layer call costs without placement logic."""

    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype, length: int):
        shape = (1, cfg.num_kv_heads, length, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def new_rows(self, start: int, num_new: int) -> None:
        return None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Any) -> torch.Tensor:
        from ..models.attention import attention
        end = ctx.start + k.shape[2]
        self.k[:, :, ctx.start:end], self.v[:, :, ctx.start:end] = k, v
        return attention(q, self.k[:, :, :end], self.v[:, :, :end], ctx.mask)


def _layer_overhead(family: str, device: torch.device, dtype: torch.dtype, sync: Callable[[], None]) -> float:
    """One decode-token layer call of a tiny model of ``family``: nearly all dispatch."""
    from ..config import KNOWN_SHAPES
    from ..models import get_model
    from ..models.base import StepContext
    base = KNOWN_SHAPES["opt-125m" if family == "opt" else "smollm2-135m"]
    cfg = base.with_(hidden_size=64, num_heads=4, num_kv_heads=2 if family == "llama" else 4,
                     head_dim=16, ffn_dim=128, num_layers=1, word_embed_proj_dim=64)
    model = get_model(cfg)
    w = {k: (torch.randn(s, device=device) * 0.02).to(dtype) for k, s in model.shapes()[0].items()}
    x = torch.randn(1, 1, 64, device=device).to(dtype)
    kv = _PlainKV(cfg, device, dtype, 64)
    ctx = StepContext(positions=torch.full((1, 1), 31, device=device), start=31,
                      mask=torch.ones(1, 1, 1, 32, dtype=torch.bool, device=device))
    model.prepare(ctx)
    with torch.inference_mode():
        return _timeit(lambda: model.layer(w, x, ctx, kv), sync=sync)


def _disk_rates(offload_dir: str | None, nbytes: int, log: Callable[[str], None]) -> tuple[float, float]:
    """Write then read ``nbytes`` in 64 MiB pieces through DiskFile + IOPool (O_DIRECT)."""
    from ..disk import IOPool, OffloadDir, aligned_empty
    piece = 64 << 20
    n = max(1, nbytes // piece)
    log(f"disk: {n * piece >> 20} MiB through the I/O pool")
    with OffloadDir(offload_dir) as od, IOPool(4) as io:
        f = od.new_file("profile.bin", n * piece)
        bufs = [aligned_empty(piece) for _ in range(4)]
        for b in bufs:
            b.fill_(7)
        t0 = time.perf_counter()
        futs = [io.submit(f.write_from, i * piece, bufs[i % 4]) for i in range(n)]
        for fu in futs:
            fu.result()
        f.sync()
        write = n * piece / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        # as the engine does: a layer's read at a time, the next one in flight
        for i in range(0, n, 2):
            fs = [io.submit(f.read_into, j * piece, bufs[j % 4]) for j in range(i, min(n, i + 2))]
            for fu in fs:
                fu.result()
        read = n * piece / (time.perf_counter() - t0)
        f.close()
    return read, write


def _contention(offload_dir: str | None, dtype: torch.dtype, seconds: float,
                log: Callable[[str], None]) -> tuple[float, float]:
    """(compute slowdown under disk I/O, disk slowdown under compute), each >= 1, measured
    by running a matmul loop and a disk read loop alone and then together."""
    from ..disk import IOPool, OffloadDir, aligned_empty
    log("overlap: matmul and disk reads, alone and together")
    x = torch.randn(64, 2048).to(dtype)
    w = torch.randn(8192, 2048).to(dtype)
    piece = 32 << 20
    with OffloadDir(offload_dir) as od, IOPool(2) as io:
        f = od.new_file("contention.bin", 8 * piece)
        buf = aligned_empty(piece)
        buf.fill_(1)
        for i in range(8):
            f.write_from(i * piece, buf)
        stop = threading.Event()

        def disk_loop(counter: list[int]) -> None:
            i = 0
            while not stop.is_set():
                f.read_into((i % 8) * piece, buf)
                counter[0] += piece
                i += 1

        def mm_loop(until: float) -> int:
            n = 0
            while time.perf_counter() < until:
                torch.nn.functional.linear(x, w)
                n += 1
            return n

        t0 = time.perf_counter()
        mm_alone = mm_loop(t0 + seconds) / (time.perf_counter() - t0)
        cnt = [0]
        stop.clear()
        fut = io.submit(disk_loop, cnt)
        time.sleep(seconds)
        stop.set()
        fut.result()
        disk_alone = cnt[0] / seconds
        cnt = [0]
        stop.clear()
        fut = io.submit(disk_loop, cnt)
        t0 = time.perf_counter()
        mm_both = mm_loop(t0 + seconds) / (time.perf_counter() - t0)
        stop.set()
        fut.result()
        disk_both = cnt[0] / (time.perf_counter() - t0)
        f.close()
    return max(1.0, mm_alone / max(mm_both, 1e-9)), max(1.0, disk_alone / max(disk_both, 1e-9))


def _cuda_links(device: torch.device, nbytes: int = 256 << 20) -> dict[str, float]:
    """Host<->device bandwidth both ways, pinned and pageable, timed with CUDA events."""
    out = {}
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for pinned in (True, False):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=pinned)),
                         ("d2h", lambda: host.copy_(dev, non_blocking=pinned))):
            fn()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
            end.synchronize()
            out[f"{name}_{'pinned' if pinned else 'pageable'}_Bps"] = 5 * nbytes / (start.elapsed_time(end) / 1e3)
    return out


def measure_profile(device: str | None = None, offload_dir: str | None = None,
                    disk_bytes: int = 512 << 20, log: Callable[[str], None] | None = None,
                    dtypes: tuple[torch.dtype, ...] | None = None) -> HardwareProfile:
    """Measure this machine (about 30 s on a 2-core CPU box)."""
    from ..tiers import _existing_parent, host_available_bytes
    log = log or (lambda s: None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProfileError("device 'cuda' asked for but no CUDA GPU is available")
    host_dtypes = dtypes or (torch.bfloat16, torch.float32)
    host = _device_rates(torch.device("cpu"), host_dtypes, log)
    links: dict[str, float] = {}
    if dev.type == "cuda":
        compute = _device_rates(dev, dtypes or (torch.float16, torch.bfloat16, torch.float32), log)
        links = _cuda_links(dev)
        gpu_mem = torch.cuda.mem_get_info(dev)[1]
    else:
        compute = host
        gpu_mem = host_available_bytes()
    read, write = _disk_rates(offload_dir, disk_bytes, log)
    slow_c, slow_io = _contention(offload_dir, host_dtypes[0], 1.0, log) if dev.type == "cpu" else (1.0, 1.0)
    disk_free = shutil.disk_usage(_existing_parent(offload_dir or tempfile.gettempdir())).free
    return HardwareProfile(
        name=socket.gethostname(), device=dev.type, gpu_mem=int(gpu_mem), cpu_mem=host_available_bytes(),
        disk=int(disk_free), disk_read_Bps=read, disk_write_Bps=write, compute=compute, host=host,
        io_slows_compute=slow_c, compute_slows_io=slow_io, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        notes=f"measured by tiergen profile on {os.cpu_count()} cores, torch {torch.__version__}", **links)


# ---------------------------------------------------------------- hand-built profiles

def roofline_table(peak_flops: float, mem_Bps: float, bytes_per_weight: float = 2.0) -> MatmulTable:
    """A matmul table from a roofline: thin matmuls read the weight once per call, so
    rate = min(peak, 2 * rows * size / (size * bytes_per_weight / mem_Bps))."""
    flops = tuple(tuple(min(peak_flops, 2.0 * r * mem_Bps / bytes_per_weight) for _ in GRID_SHAPES)
                  for r in GRID_ROWS)
    return MatmulTable(GRID_ROWS, tuple(o * i for o, i in GRID_SHAPES), flops)


GB = 10 ** 9


def t4_paper_profile() -> HardwareProfile:
    """The FlexGen paper's machine: an NVIDIA T4 (16 GB), 208 GB DRAM, 1.5 TB SSD, PCIe 3.0 x16.

    Assumed rates (not measured: we do not have this box):
    - T4 fp16 matmul 30 TFLOP/s sustained (tensor-core peak is 65 at its 70 W cap, which
      real GEMMs do not hold); thin (decode) matmuls are bound by its 320 GB/s memory,
      of which we assume 250 GB/s is reached.
    - PCIe ~12 GB/s pinned both ways (the paper's figure), pageable half of that.
    - SSD 2.0 GB/s read and 1.0 GB/s write, the local NVMe SSD figures the paper quotes.
    - Host: 32 vCPUs; fp32 matmul 1 TFLOP/s; decode attention streams the cache at 20 GB/s.
    """
    gpu_table = roofline_table(30e12, 250e9)
    gpu = DeviceRates(matmul={"float16": gpu_table, "bfloat16": gpu_table, "float32": gpu_table.scaled(8e12 / 30e12)},
                      attn_decode_Bps=200e9, attn_prefill_flops=20e12, elementwise_Bps=200e9,
                      op_overhead_s=10e-6, dequant_Bps=100e9)
    cpu_table = roofline_table(1e12, 60e9, 4.0)
    cpu = DeviceRates(matmul={"float32": cpu_table, "bfloat16": cpu_table.scaled(0.5),
                              "float16": cpu_table.scaled(0.05)},
                      attn_decode_Bps=20e9, attn_prefill_flops=0.5e12, elementwise_Bps=30e9,
                      op_overhead_s=10e-6, dequant_Bps=5e9)
    return HardwareProfile(
        name="t4-paper", device="cuda", gpu_mem=16 * GB, cpu_mem=208 * GB, disk=1500 * GB,
        disk_read_Bps=2.0 * GB, disk_write_Bps=1.0 * GB, compute=gpu, host=cpu,
        h2d_pinned_Bps=12 * GB, h2d_pageable_Bps=6 * GB, d2h_pinned_Bps=12 * GB, d2h_pageable_Bps=6 * GB,
        notes="hand-built from the FlexGen paper's hardware; rates assumed, see t4_paper_profile()")
