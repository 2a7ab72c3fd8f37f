"""Run a command under a cgroup v1 memory cap that the page cache cannot escape.

In cgroup v1 the page cache a process reads is charged to its memory cgroup, so
a 2 GiB cap on a process that streams a 2.6 GB model from disk keeps at most
~2 GiB of it cached: the rest has to come from the disk again. Setting
``memory.memsw.limit_in_bytes`` to the same value stops it escaping to swap.

Pages that are already cached and charged to another cgroup are *not* charged
again when the capped process reads them, so before each run the page cache is
dropped (``/proc/sys/vm/drop_caches``, root only) and, as a fallback or in
addition, the named files are evicted with ``posix_fadvise(DONTNEED)``.

    python benchmarks/cgroup.py --check          # prove that the cap holds
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
GiB = 1 << 30

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40, "t": 1e12, "tb": 1e12}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '1.5G', '800MiB', '2147483648' -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace("_", "")
    i = len(s)
    while i and not (s[i - 1].isdigit() or s[i - 1] == "."):
        i -= 1
    num, unit = s[:i], s[i:].strip()
    if not num or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (e.g. 2GiB, 1.5G, 800MiB)")
    return int(float(num) * _UNITS[unit])


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.5 * GiB else f"{n / (1 << 20):.0f} MiB"


@dataclass
class CappedRun:
    """What ``run_capped`` saw. Unpacks as (returncode, stdout, stderr, peak_bytes)."""

    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int                    # memory.max_usage_in_bytes (RSS + page cache)
    mem_bytes: int                     # the cap
    peak_anon_bytes: int               # max sampled memory.stat rss (anonymous memory)
    peak_anon_mapped_bytes: int        # max sampled rss + mapped_file (mmap'd files too)
    wall_s: float
    disk_read_bytes: int               # /proc/diskstats delta over the run (whole machine)
    cpu_self_s: float                  # CPU seconds used by the command (and its waited children)
    cpu_others_s: float                # CPU seconds the rest of the machine used meanwhile
    loadavg_before: float              # 1-minute load average when it started
    oom_killed: bool                   # the kernel's OOM killer fired inside the cgroup
    timed_out: bool
    oom_kill_count: int                # from memory.oom_control (-1: not reported)
    failcnt: int                       # times usage hit the cap (reclaim, not OOM)
    memsw_capped: bool                 # memory.memsw.limit_in_bytes was set too
    caches_dropped: bool               # /proc/sys/vm/drop_caches accepted the write
    evicted: dict[str, float] = field(default_factory=dict)  # file -> resident fraction left
    cgroup: str = ""
    stat: dict[str, int] = field(default_factory=dict)        # memory.stat at the end

    def __iter__(self) -> Iterator[object]:
        # the short form the brief asks for: rc, out, err, peak = run_capped(...)
        return iter((self.returncode, self.stdout, self.stderr, self.peak_bytes))

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("stdout")
        d.pop("stderr")
        return d


# ---------------------------------------------------------------- page cache

def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; True if the kernel took it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def evict_files(paths: Sequence[str | os.PathLike[str]]) -> dict[str, float]:
    """fsync + posix_fadvise(DONTNEED) every regular file under ``paths``.

    Returns file -> resident fraction after eviction (0.0 when it worked)."""
    out: dict[str, float] = {}
    for p in _walk_files(paths):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        try:
            out[str(p)] = round(resident_fraction(p), 4)
        except OSError:
            out[str(p)] = -1.0
    return out


def resident_fraction(path: str | os.PathLike[str]) -> float:
    """Share of a file's pages that sit in the page cache (mincore)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    npages = (size + page - 1) // page
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1.0
        try:
            vec = (ctypes.c_ubyte * npages)()
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
                return -1.0
            return sum(v & 1 for v in bytes(vec)) / npages
        finally:
            _libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


def disk_read_bytes() -> int:
    """Bytes read from all physical disks so far (/proc/diskstats, whole disks
    only). System-wide: other processes' reads count too."""
    try:
        disks = {d for d in os.listdir("/sys/block") if not d.startswith(("loop", "ram", "zram"))}
        total = 0
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if len(f) > 5 and f[2] in disks:
                total += int(f[5]) * 512  # sectors read are 512-byte units
        return total
    except (OSError, ValueError):
        return -1


def machine_busy_s() -> float:
    """CPU seconds all cores have spent not idle since boot (/proc/stat)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return -1.0


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def mappers(paths: Sequence[str | os.PathLike[str]]) -> dict[int, list[str]]:
    """Processes that have any file under ``paths`` mapped or open. Their pages
    survive drop_caches and, charged to their cgroup, are read for free by a
    capped run: the cap would leak."""
    files = {str(p) for p in _walk_files(paths)}
    hits: dict[int, list[str]] = {}
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == me:
            continue
        found: set[str] = set()
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                name = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if name in files:
                    found.add(name)
            fd_dir = Path(f"/proc/{pid}/fd")
            for fd in fd_dir.iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target in files:
                    found.add(target)
        except OSError:
            continue
        if found:
            hits[int(pid)] = sorted(found)
    return hits


def _walk_files(paths: Sequence[str | os.PathLike[str]]) -> Iterator[Path]:
    for p in map(Path, paths):
        if p.is_file():
            yield p
        elif p.is_dir():
            for q in sorted(p.rglob("*")):
                if q.is_file():
                    yield q


# ---------------------------------------------------------------- cgroup

def _parent_cgroup() -> Path:
    """Our own memory cgroup if we may create children in it, else the root."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrls, rel = line.split(":", 2)
            if "memory" in ctrls.split(","):
                cand = MEMORY_ROOT / rel.lstrip("/")
                if cand.is_dir() and os.access(cand, os.W_OK):
                    return cand
    except OSError:
        pass
    return MEMORY_ROOT


def available() -> str | None:
    """None if a capped run is possible here, else why not."""
    if not (MEMORY_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {MEMORY_ROOT}"
    if not os.access(_parent_cgroup(), os.W_OK):
        return f"{_parent_cgroup()} is not writable (need root)"
    return None


def _write(cg: Path, name: str, value: str | int) -> bool:
    try:
        (cg / name).write_text(f"{value}\n")
        return True
    except OSError:
        return False


def _read_int(cg: Path, name: str, default: int = -1) -> int:
    try:
        return int((cg / name).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def _read_kv(cg: Path, name: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in (cg / name).read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().lstrip("-").isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def _pids(cg: Path) -> list[int]:
    try:
        return [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _remove_cgroup(cg: Path) -> None:
    """Kill what is left inside (only our own child's tree lives there), free its
    page cache charge, and rmdir it."""
    for _ in range(50):
        pids = _pids(cg)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    _write(cg, "memory.force_empty", 0)  # uncharge (and drop) the cache it holds
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"cgroup: warning: could not remove {cg}", file=sys.stderr)


class _Sampler(threading.Thread):
    """Polls memory.stat: max_usage counts page cache, which a streaming run
    always fills up to the cap, so the anonymous peak is sampled too."""

    def __init__(self, cg: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.cg, self.every = cg, every
        self.peak_anon = 0
        self.peak_anon_mapped = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while True:
            self.sample()
            if self._halt.wait(self.every):
                break

    def sample(self) -> None:
        st = _read_kv(self.cg, "memory.stat")
        anon = st.get("rss", 0)
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_anon_mapped = max(self.peak_anon_mapped, anon + st.get("mapped_file", 0))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run_capped(cmd: list[str], mem_bytes: int, timeout: float, *,
               drop_caches: bool = True, evict: Sequence[str | os.PathLike[str]] = (),
               env: dict[str, str] | None = None, cwd: str | None = None,
               sample_s: float = 0.2) -> CappedRun:
    """Run ``cmd`` in a fresh memory cgroup capped at ``mem_bytes`` (RAM + page
    cache, and swap when memsw exists); return its output and peak usage.

    ``evict``: files or dirs whose pages are pushed out of the page cache first,
    so that the capped run has to read them from disk (and gets charged)."""
    why = available()
    if why:
        raise RuntimeError(why)
    dropped = drop_page_cache() if drop_caches else False
    evicted = evict_files(evict) if evict else {}

    cg = _parent_cgroup() / f"tiergen-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        _write(cg, "memory.swappiness", 0)
        if not _write(cg, "memory.limit_in_bytes", mem_bytes):
            raise RuntimeError(f"cannot set memory.limit_in_bytes in {cg}")
        memsw = False
        if (cg / "memory.memsw.limit_in_bytes").exists():
            memsw = _write(cg, "memory.memsw.limit_in_bytes", mem_bytes)
        _write(cg, "memory.oom_control", 0)  # OOM killer on (the default)
        procs = str(cg / "cgroup.procs")

        def enter() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        t0 = time.perf_counter()
        timed_out = False
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=enter, start_new_session=True, env=env, cwd=cwd)
        sampler = _Sampler(cg, sample_s)
        sampler.start()
        rd0 = disk_read_bytes()
        busy0, kids0, load0 = machine_busy_s(), _children_cpu_s(), os.getloadavg()[0]
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            try:
                os.killpg(p.pid, signal.SIGKILL)  # the session we just started
            except ProcessLookupError:
                pass
            out, err = p.communicate()
        finally:
            sampler.stop()
        wall = time.perf_counter() - t0
        rd = disk_read_bytes() - rd0 if rd0 >= 0 else -1
        mine = _children_cpu_s() - kids0
        others = machine_busy_s() - busy0 - mine

        oom = _read_kv(cg, "memory.oom_control")
        kills = oom.get("oom_kill", -1)
        rc = p.returncode
        return CappedRun(
            returncode=rc, stdout=out, stderr=err,
            peak_bytes=_read_int(cg, "memory.max_usage_in_bytes"), mem_bytes=mem_bytes,
            peak_anon_bytes=sampler.peak_anon, peak_anon_mapped_bytes=sampler.peak_anon_mapped,
            wall_s=round(wall, 3), disk_read_bytes=rd,
            cpu_self_s=round(mine, 2), cpu_others_s=round(max(0.0, others), 2),
            loadavg_before=round(load0, 2),
            oom_killed=kills > 0 or (rc == -signal.SIGKILL and not timed_out),
            timed_out=timed_out, oom_kill_count=kills,
            failcnt=_read_int(cg, "memory.failcnt"), memsw_capped=memsw,
            caches_dropped=dropped, evicted=evicted, cgroup=str(cg),
            stat={k: v for k, v in _read_kv(cg, "memory.stat").items()
                  if k in ("cache", "rss", "mapped_file", "pgmajfault", "total_pgmajfault")})
    finally:
        _remove_cgroup(cg)


# ---------------------------------------------------------------- --check

_ALLOC = """
import sys
n = int(sys.argv[1])
b = bytearray(n)           # zero pages are not charged until touched
for i in range(0, n, 4096):
    b[i] = 1
print("allocated", n)
"""

_READ = """
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
n = 0
while True:
    chunk = os.read(fd, 8 << 20)
    if not chunk:
        break
    n += len(chunk)
print("read", n)
"""


def check(mem_bytes: int = 2 * GiB, big: int = 3 * GiB, tmpdir: str | None = None) -> bool:
    """Prove the cap holds: an allocation above it is OOM-killed, and streaming a
    file above it through the page cache keeps peak usage at or below it."""
    ok = True
    r = run_capped([sys.executable, "-c", _ALLOC, str(big)], mem_bytes, 120)
    good = r.oom_killed and r.returncode != 0
    ok &= good
    print(json.dumps({"test": "allocate 3 GiB under 2 GiB cap", "pass": good,
                      **r.summary()}))

    with tempfile.TemporaryDirectory(prefix="tiergen-cgcheck-", dir=tmpdir) as d:
        path = Path(d) / "big.bin"
        block = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(big >> 20):
                f.write(block)
        r = run_capped([sys.executable, "-c", _READ, str(path)], mem_bytes, 300, evict=[path])
        # it must have come from the disk (not from pages cached elsewhere) and
        # the cache it filled must have stayed under the cap
        from_disk = r.disk_read_bytes < 0 or r.disk_read_bytes >= 0.9 * big
        good = (r.returncode == 0 and f"read {big}" in r.stdout and 0 < r.peak_bytes <= mem_bytes
                and not r.oom_killed and from_disk)
        ok &= good
        print(json.dumps({"test": "read a 3 GiB file under 2 GiB cap", "pass": good,
                          "file_bytes": big, **r.summary()}))
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="prove the cap works (needs ~3 GiB in --tmpdir)")
    ap.add_argument("--mem", type=float, default=2.0, help="cap in GiB (default 2)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--tmpdir", default=None)
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command to run under the cap")
    a = ap.parse_args(argv)
    cap = int(a.mem * GiB)
    if a.check:
        return 0 if check(cap, tmpdir=a.tmpdir) else 1
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        ap.error("give --check or a command after --")
    r = run_capped(cmd, cap, a.timeout)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(json.dumps(r.summary()), file=sys.stderr)
    return r.returncode if r.returncode >= 0 else 128 - r.returncode


if __name__ == "__main__":
    sys.exit(main())
