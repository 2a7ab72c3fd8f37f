"""The disk tier's I/O path: preallocated files read and written with O_DIRECT
straight into tensor memory, an I/O thread pool, the offload directory's
lifetime, and byte counters per link.

O_DIRECT keeps the page cache out of the way, so what is measured (and what the
cost model is fed) is the disk, and host RAM is not silently spent caching the
very data that was offloaded to save it. O_DIRECT needs the file offset, the
length and the memory address to be multiples of the logical block size; 4096
covers every common device, so everything here aligns to 4096.
"""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator

import torch

from .errors import DiskFullError, InvalidRequestError
from .host_heap import anonymous_bytes

ALIGN = 4096
CHUNK = 64 << 20          # largest zero-copy piece per system call
BOUNCE_CHUNK = 16 << 20   # largest bounced piece: bounds each thread's bounce buffer
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)   # absent on macOS: buffered fallback there
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor of `nbytes` whose data pointer is
    4096-aligned and whose storage is rounded up to a multiple of 4096 (at least
    4096), so O_DIRECT may move whole blocks into and out of it.

    pin=True gives page-locked memory when CUDA is available (fast, async
    host<->GPU copies); without CUDA pinning means nothing and is ignored."""
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    cap = max(ALIGN, _round_up(nbytes))
    if pin and torch.cuda.is_available():
        buf = torch.empty(cap, dtype=torch.uint8, pin_memory=True)
        if buf.data_ptr() % ALIGN:
            # cudaHostAlloc is page-aligned, but the host-register allocator
            # option pins malloc memory that need not be: over-allocate, slice.
            buf = torch.empty(cap + ALIGN, dtype=torch.uint8, pin_memory=True)
            skip = (-buf.data_ptr()) % ALIGN
            buf = buf[skip:skip + cap]
        assert buf.data_ptr() % ALIGN == 0, "pinned host memory is not page-aligned"
        return buf[:nbytes]
    return anonymous_bytes(cap, ALIGN)[:nbytes]


def _byte_view(t: torch.Tensor, what: str) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor's memory."""
    if t.device.type != "cpu":
        raise ValueError(f"{what} must be a CPU tensor, got one on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    return t.detach().reshape(-1).view(torch.uint8)


def _mem(flat: torch.Tensor) -> memoryview:
    """A writable buffer over a flat uint8 tensor, for preadv/pwritev. numpy's
    array shares the memory and keeps the tensor alive while the view exists."""
    return memoryview(flat.numpy())


class _Bounce(threading.local):
    """One aligned bounce buffer per thread, so pool threads never share one."""
    buf: torch.Tensor | None = None
    mv: memoryview | None = None


_bounce_tls = _Bounce()


def _bounce(nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """This thread's bounce buffer, grown to at least nbytes (4096 multiple)."""
    if _bounce_tls.buf is None or _bounce_tls.buf.numel() < nbytes:
        buf = aligned_empty(_round_up(nbytes))
        _bounce_tls.buf, _bounce_tls.mv = buf, _mem(buf)
    assert _bounce_tls.buf is not None and _bounce_tls.mv is not None
    return _bounce_tls.buf, _bounce_tls.mv


def _segments(offset: int, n: int, addr: int, direct: bool) -> Iterator[tuple[int, int, bool]]:
    """Split [offset, offset+n) of a file whose bytes go to/come from memory at
    addr into (file position, length, zero_copy) pieces. Zero copy needs the
    file position, length and address all aligned; when the file offset and
    the address share the same misalignment only the edges need bouncing."""
    end = offset + n
    if not direct:   # buffered I/O has no alignment rules
        for p in range(offset, end, CHUNK):
            yield p, min(CHUNK, end - p), True
        return
    if (addr - offset) % ALIGN:   # misaligned against each other: every byte bounces
        for p in range(offset, end, BOUNCE_CHUNK):
            yield p, min(BOUNCE_CHUNK, end - p), False
        return
    head = min(n, (-offset) % ALIGN)
    body = (n - head) // ALIGN * ALIGN
    if head:
        yield offset, head, False
    body_end = offset + head + body
    for p in range(offset + head, body_end, CHUNK):
        yield p, min(CHUNK, body_end - p), True
    if end > body_end:
        yield body_end, end - body_end, False


class DiskFile:
    """One preallocated file of `nbytes` bytes, read and written at any offset
    with O_DIRECT where the file system allows it (`direct`), else with
    buffered I/O whose pages are dropped from the cache after each call.

    The file is created (it must not exist) and allocated up front with
    posix_fallocate, rounded up to whole 4096-byte blocks so O_DIRECT can
    always move the last block whole; a full disk raises DiskFullError here,
    before any work is done. Safe to use from several threads at once on
    disjoint byte ranges."""

    def __init__(self, path: str | os.PathLike[str], nbytes: int, direct: bool = True) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.path = os.fspath(path)
        self.nbytes = nbytes
        # Edge blocks of unaligned O_DIRECT writes are read, patched and written
        # back; writes to disjoint ranges that share a block must not interleave
        # that. Striped by block index so unrelated writes do not serialise.
        self._locks = [threading.Lock() for _ in range(64)]
        self._keepalive: Any = None   # set by OffloadDir: a file keeps its directory
        size = _round_up(nbytes)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        # Created buffered, O_DIRECT switched on after: an O_DIRECT open that a
        # file system refuses can fail after the file was already created.
        self._fd = os.open(self.path, flags, 0o600)
        try:
            if size:
                self._allocate(size)
            if direct and _O_DIRECT:
                self.direct = self._try_direct(probe=size > 0)
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            os.unlink(self.path)
            raise

    # -- setup ---------------------------------------------------------------

    def _full(self, needed: int) -> DiskFullError:
        d = os.path.dirname(os.path.abspath(self.path))
        try:
            free = f", {shutil.disk_usage(d).free} free"
        except OSError:
            free = ""
        err = DiskFullError(f"disk full: {d} needs {needed} more bytes for "
                            f"{os.path.basename(self.path)}{free}")
        err.errno = errno.ENOSPC   # still looks like ENOSPC to generic OSError handlers
        return err

    def _allocate(self, size: int) -> None:
        try:
            os.posix_fallocate(self._fd, 0, size)
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise self._full(size) from e
            raise

    def _try_direct(self, probe: bool) -> bool:
        """Switch the fd to O_DIRECT if this file system takes it. Found by
        trying, not from a list: the kernel refuses it with EINVAL when the file
        system cannot (older tmpfs, some FUSE); some accept the flag and refuse
        the I/O, hence one aligned probe read of the first block."""
        fl = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fl | _O_DIRECT)
            if probe:
                self._pread_full(_bounce(ALIGN)[1][:ALIGN], 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fl)
            return False
        return True

    # -- I/O -----------------------------------------------------------------

    def _check(self, offset: int, n: int) -> None:
        if self._fd < 0:
            raise ValueError(f"I/O on closed DiskFile {self.path}")
        if offset < 0 or offset + n > self.nbytes:
            raise ValueError(f"range [{offset}, {offset + n}) outside {self.path} "
                             f"of {self.nbytes} bytes")

    def _pread_full(self, mv: memoryview, pos: int) -> None:
        done = 0
        while done < len(mv):   # short reads are legal: loop
            k = os.preadv(self._fd, [mv[done:]], pos + done)
            if k == 0:
                raise OSError(errno.EIO, f"unexpected end of file at byte {pos + done}", self.path)
            done += k

    def _pwrite_full(self, mv: memoryview, pos: int) -> None:
        done = 0
        try:
            while done < len(mv):
                k = os.pwritev(self._fd, [mv[done:]], pos + done)
                if k == 0:
                    raise OSError(errno.EIO, f"write made no progress at byte {pos + done}", self.path)
                done += k
        except OSError as e:
            # Preallocation makes this rare, but copy-on-write and thin-provisioned
            # file systems can still run out at write time.
            if e.errno in _FULL_ERRNOS:
                raise self._full(len(mv) - done) from e
            raise

    def _drop_cache(self, offset: int, n: int) -> None:
        """Buffered fallback: evict the range so the page cache is neither what
        gets measured nor where offloaded bytes silently stay in RAM."""
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, n, os.POSIX_FADV_DONTNEED)

    def read_into(self, offset: int, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` with out.nbytes bytes read from
        `offset`."""
        flat = _byte_view(out, "out")
        n = flat.numel()
        self._check(offset, n)
        if n == 0:
            return
        mv = _mem(flat)
        for pos, ln, zero_copy in _segments(offset, n, flat.data_ptr(), self.direct):
            rel = pos - offset
            if zero_copy:
                self._pread_full(mv[rel:rel + ln], pos)
                continue
            a0, a1 = pos // ALIGN * ALIGN, _round_up(pos + ln)
            buf, bmv = _bounce(a1 - a0)
            self._pread_full(bmv[:a1 - a0], a0)
            flat[rel:rel + ln].copy_(buf[pos - a0:pos - a0 + ln])
        if not self.direct:
            self._drop_cache(offset, n)

    def write_from(self, offset: int, data: torch.Tensor) -> None:
        """Write the bytes of the contiguous CPU tensor `data` at `offset`."""
        flat = _byte_view(data, "data")
        n = flat.numel()
        self._check(offset, n)
        if n == 0:
            return
        mv = _mem(flat)
        for pos, ln, zero_copy in _segments(offset, n, flat.data_ptr(), self.direct):
            rel = pos - offset
            if zero_copy:
                self._pwrite_full(mv[rel:rel + ln], pos)
            else:
                self._write_bounced(pos, flat[rel:rel + ln])
        if not self.direct:
            self.sync()   # DONTNEED skips dirty pages: they must reach the disk first
            self._drop_cache(offset, n)

    def _write_bounced(self, pos: int, src: torch.Tensor) -> None:
        """O_DIRECT write of an unaligned piece: whole blocks through the bounce
        buffer, with partly covered edge blocks read first (read-modify-write)."""
        ln = src.numel()
        a0, a1 = pos // ALIGN * ALIGN, _round_up(pos + ln)
        w = a1 - a0
        buf, bmv = _bounce(w)
        head_partial = pos != a0
        tail_partial = pos + ln != a1
        stripes = sorted({(b // ALIGN) % len(self._locks)
                          for b, partial in ((a0, head_partial), (a1 - ALIGN, tail_partial)) if partial})
        locks = [self._locks[s] for s in stripes]
        for lk in locks:   # sorted order: no deadlock between two writers
            lk.acquire()
        try:
            if head_partial:
                self._pread_full(bmv[:ALIGN], a0)
            if tail_partial and (a1 - ALIGN > a0 or not head_partial):
                self._pread_full(bmv[w - ALIGN:w], a1 - ALIGN)
            buf[pos - a0:pos - a0 + ln].copy_(src)
            self._pwrite_full(bmv[:w], a0)
        finally:
            for lk in reversed(locks):
                lk.release()

    def sync(self) -> None:
        """Flush written data to stable storage (fdatasync)."""
        if self._fd < 0:
            raise ValueError(f"I/O on closed DiskFile {self.path}")
        os.fdatasync(self._fd)

    # -- lifetime --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> DiskFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DiskFile({self.path!r}, {self.nbytes}, direct={self.direct})"


class IOPool:
    """A few I/O threads. preadv/pwritev and torch copies release the GIL, so
    disk transfers submitted here overlap with compute in the main thread."""

    def __init__(self, num_threads: int = 4) -> None:
        self._ex = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tiergen-io")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        return self._ex.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        self._ex.shutdown(wait=wait)

    def __enter__(self) -> IOPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


# -- offload directory and its cleanup ----------------------------------------

# Finalizers of the directories not yet removed, by path; called on a fatal
# signal. Reentrant: the signal handler runs in the main thread, possibly while
# that thread holds the lock.
_live: dict[str, weakref.finalize] = {}
_live_lock = threading.RLock()
_prev_handlers: dict[int, Any] = {}
_handlers_installed = False


def _remove_dir(path: str, files: weakref.WeakSet[DiskFile], owner_pid: int) -> None:
    with _live_lock:
        _live.pop(path, None)
    # Close first: an unlinked file still holds its blocks while an fd is open.
    for f in list(files):
        f.close()
    # A forked child inherits the registry; only the creator removes the tree.
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


def _remove_all() -> None:
    with _live_lock:
        pending = list(_live.values())
    for fin in pending:
        fin()


def _on_signal(signum: int, frame: Any) -> None:
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        # A Python handler, e.g. SIGINT's default_int_handler raising
        # KeyboardInterrupt: the program may catch it and go on using its
        # directories, so keep them; if it exits instead, atexit removes them.
        prev(signum, frame)
        return
    # SIG_DFL: the process dies without running atexit, so remove the
    # directories now, then die the default way (the exit status shows it).
    _remove_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)   # not reached unless the signal was blocked


def _install_signal_handlers() -> None:
    global _handlers_installed
    # signal.signal only works in the main thread; retry on a later OffloadDir.
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN or prev is None:
            continue   # ignored (the process survives it) or set outside Python: leave alone
        try:
            signal.signal(sig, _on_signal)
        except ValueError:   # e.g. a sub-interpreter
            return
        _prev_handlers[sig] = prev
    _handlers_installed = True


class OffloadDir:
    """A private directory (mkdtemp under `parent`, default the system temp
    dir) holding the disk tier's files. It is removed by close(), by garbage
    collection once neither it nor any of its files is referenced, at
    interpreter exit, and on SIGTERM/SIGINT when they would kill the process."""

    def __init__(self, parent: str | os.PathLike[str] | None = None) -> None:
        try:
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix="tiergen-", dir=parent)
        except OSError as e:   # a file in the way, no permission, a read-only file system
            raise InvalidRequestError(f"cannot use offload dir {os.fspath(parent or tempfile.gettempdir())}: "
                                      f"{e.strerror or e}") from None
        self._files: weakref.WeakSet[DiskFile] = weakref.WeakSet()
        # finalize runs once: on close(), on collection, or at exit (atexit=True).
        self._finalizer = weakref.finalize(self, _remove_dir, self.path, self._files, os.getpid())
        with _live_lock:
            _live[self.path] = self._finalizer
        _install_signal_handlers()

    def new_file(self, name: str, nbytes: int, direct: bool = True) -> DiskFile:
        """Create and preallocate `name` (a plain file name) in this directory."""
        if self.closed:
            raise ValueError(f"OffloadDir {self.path} is closed")
        if not name or name in (".", "..") or os.path.basename(name) != name:
            raise ValueError(f"file name must be a plain name, got {name!r}")
        f = DiskFile(os.path.join(self.path, name), nbytes, direct=direct)
        f._keepalive = self
        self._files.add(f)
        return f

    def free_bytes(self) -> int:
        """Free bytes on the file system holding this directory."""
        return shutil.disk_usage(self.path).free

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close every file and remove the directory tree; idempotent."""
        self._finalizer()

    def __enter__(self) -> OffloadDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OffloadDir({self.path!r}{', closed' if self.closed else ''})"


class LinkCounter:
    """Bytes moved per link ("disk->cpu", "cpu->gpu", ...); thread-safe, as
    I/O threads and the main thread add to it concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}

    def add(self, link: str, n: int) -> None:
        if n < 0:
            raise ValueError(f"byte count must be >= 0, got {n}")
        with self._lock:
            self._bytes[link] = self._bytes.get(link, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)

    def reset(self) -> None:
        with self._lock:
            self._bytes.clear()
