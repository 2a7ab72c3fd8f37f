"""The disk I/O path: byte-exact round trips at any offset and size, O_DIRECT
where the file system allows it, zero copy when aligned, concurrency, the
offload directory's cleanup (close, gc, exit, signals) and a full disk."""
import errno
import fcntl
import gc
import mmap
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from tiergen import disk
from tiergen.disk import ALIGN, DiskFile, IOPool, LinkCounter, OffloadDir, aligned_empty
from tiergen.errors import DiskFullError, TiergenError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rand_tensor(nbytes: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bytes (any bit pattern, NaNs included) viewed as `dtype`."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def fs_takes_o_direct(directory: str) -> bool:
    """Independent probe: can a file here be opened and read with O_DIRECT?"""
    if not hasattr(os, "O_DIRECT"):
        return False
    p = os.path.join(directory, f".odirect-probe-{os.getpid()}")
    try:
        fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, ALIGN)
        buf = mmap.mmap(-1, ALIGN)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(p)


@pytest.fixture
def odir(tmp_path):
    with OffloadDir(tmp_path) as d:
        yield d


# -- aligned_empty -----------------------------------------------------------

@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17, 1 << 20])
@pytest.mark.parametrize("pin", [False, True])
def test_aligned_empty(nbytes, pin):
    t = aligned_empty(nbytes, pin=pin)
    assert t.dtype == torch.uint8 and t.device.type == "cpu" and t.numel() == nbytes
    assert t.data_ptr() % ALIGN == 0
    cap = t.untyped_storage().nbytes()
    assert cap % ALIGN == 0 and cap >= max(nbytes, 1)
    if pin and torch.cuda.is_available():
        assert t.is_pinned()
    t.fill_(7)
    assert int(t.sum()) == 7 * nbytes


def test_aligned_empty_memory_lives_as_long_as_a_view():
    view = aligned_empty(3 * ALIGN)[ALIGN:]
    gc.collect()
    view.fill_(5)   # would crash if the mapping had been freed with the base tensor
    assert int(view.sum()) == 5 * 2 * ALIGN


# -- round trips ---------------------------------------------------------------

SIZES = [1, 4095, 4096, 4097, 3 * 4096 + 17, 5 * 4096]
OFFSETS = [0, 1, 4095, 4096, 4096 + 100, 3 * 4096]
FILE_BYTES = 16 * 4096


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.uint8])
def test_round_trip_any_offset_and_size(odir, direct, dtype):
    f = odir.new_file(f"rt-{dtype}", FILE_BYTES, direct=direct)
    assert f.direct == (direct and fs_takes_o_direct(odir.path))
    # A known background, so writes that clobber neighbouring bytes show up.
    expect = rand_tensor(FILE_BYTES, torch.uint8, seed=0).clone()
    f.write_from(0, expect)
    seed = 1
    for size in SIZES:
        n = size // dtype.itemsize * dtype.itemsize or dtype.itemsize
        for off in OFFSETS:
            seed += 1
            data = rand_tensor(n, dtype, seed)
            f.write_from(off, data)
            expect[off:off + n] = as_bytes(data)
            plain = torch.empty_like(data)
            f.read_into(off, plain)
            assert torch.equal(as_bytes(plain), as_bytes(data)), (size, off)
            # Also into aligned memory: the zero-copy path whenever off and n align.
            aligned = aligned_empty(n).view(dtype)
            f.read_into(off, aligned)
            assert torch.equal(as_bytes(aligned), as_bytes(data)), (size, off)
    whole = torch.empty(FILE_BYTES, dtype=torch.uint8)
    f.read_into(0, whole)
    assert torch.equal(whole, expect)


@pytest.mark.parametrize("direct", [True, False])
def test_memory_misaligned_against_file(odir, direct):
    """Tensor address and file offset misaligned by different amounts (every
    byte bounces), and by the same amount (only the edges bounce)."""
    f = odir.new_file("mis", FILE_BYTES, direct=direct)
    base = aligned_empty(FILE_BYTES)
    for addr_skew, off in [(3, 4096), (3, 4099), (100, 4196), (0, 17)]:
        n = 2 * 4096 + 50
        dst = base[addr_skew:addr_skew + n]
        data = rand_tensor(n, torch.uint8, seed=addr_skew + off)
        f.write_from(off, data)
        f.read_into(off, dst)
        assert torch.equal(dst, data)
        src = base[addr_skew:addr_skew + n]
        src.copy_(rand_tensor(n, torch.uint8, seed=off))
        f.write_from(off, src)
        back = torch.empty(n, dtype=torch.uint8)
        f.read_into(off, back)
        assert torch.equal(back, src)


@pytest.mark.parametrize("direct", [True, False])
def test_chunked_transfers(odir, monkeypatch, direct):
    """Transfers larger than a chunk are split; bounce buffers stay bounded."""
    monkeypatch.setattr(disk, "CHUNK", 2 * ALIGN)
    monkeypatch.setattr(disk, "BOUNCE_CHUNK", ALIGN)
    f = odir.new_file("chunks", FILE_BYTES, direct=direct)
    for off, n, skew in [(0, FILE_BYTES, 0), (5, FILE_BYTES - 11, 5), (7, 9 * ALIGN + 3, 1)]:
        data = aligned_empty(n + skew)[skew:]
        data.copy_(rand_tensor(n, torch.uint8, seed=off + n))
        f.write_from(off, data)
        out = aligned_empty(n + skew)[skew:]
        f.read_into(off, out)
        assert torch.equal(out, data)


def test_zero_copy_when_aligned(odir, monkeypatch):
    f = odir.new_file("zc", FILE_BYTES)
    if not f.direct:
        pytest.skip("file system refuses O_DIRECT")
    data = aligned_empty(4 * ALIGN)
    data.copy_(rand_tensor(4 * ALIGN, torch.uint8, seed=3))

    def no_bounce(n):
        raise AssertionError("aligned I/O went through a bounce buffer")
    monkeypatch.setattr(disk, "_bounce", no_bounce)
    f.write_from(2 * ALIGN, data.view(torch.float32))
    out = aligned_empty(4 * ALIGN)
    f.read_into(2 * ALIGN, out.view(torch.bfloat16))
    assert torch.equal(out, data)


@pytest.mark.parametrize("direct", [True, False])
def test_short_reads_and_writes_loop(odir, monkeypatch, direct):
    f = odir.new_file("short", FILE_BYTES, direct=direct)
    limit = ALIGN if f.direct else 1000   # O_DIRECT short transfers stay block-sized
    real_preadv, real_pwritev = os.preadv, os.pwritev
    calls = {"r": 0, "w": 0}

    def preadv(fd, bufs, pos):
        calls["r"] += 1
        return real_preadv(fd, [memoryview(bufs[0])[:limit]], pos)

    def pwritev(fd, bufs, pos):
        calls["w"] += 1
        return real_pwritev(fd, [memoryview(bufs[0])[:limit]], pos)
    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pwritev", pwritev)
    data = rand_tensor(5 * ALIGN, torch.uint8, seed=9)
    f.write_from(ALIGN, data)
    out = torch.empty_like(data)
    f.read_into(ALIGN, out)
    assert torch.equal(out, data)
    assert calls["r"] >= 5 and calls["w"] >= 5


def test_direct_is_probed_not_assumed(tmp_path):
    for d in {str(tmp_path), REPO}:
        path = os.path.join(d, f".tiergen-test-{os.getpid()}")
        try:
            with DiskFile(path, 3 * ALIGN) as f:
                assert f.direct == fs_takes_o_direct(d)
            with pytest.raises(FileExistsError):   # never clobbers an existing file
                DiskFile(path, ALIGN)
        finally:
            os.unlink(path)
        with DiskFile(path, 10, direct=False) as f:
            assert not f.direct
        os.unlink(path)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this OS")
@pytest.mark.parametrize("refused_at", ["fcntl", "first read"])
def test_falls_back_when_fs_refuses_o_direct(tmp_path, monkeypatch, refused_at):
    """File systems refuse O_DIRECT either when the flag is set or at the
    first I/O; either way the file ends up buffered and still works."""
    real_fcntl, real_preadv = fcntl.fcntl, os.preadv

    def fake_fcntl(fd, cmd, arg=0):
        if refused_at == "fcntl" and cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_fcntl(fd, cmd, arg)

    def fake_preadv(fd, bufs, pos):
        if real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_preadv(fd, bufs, pos)
    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    monkeypatch.setattr(os, "preadv", fake_preadv)
    with DiskFile(tmp_path / "f", 3 * ALIGN + 5) as f:
        assert not f.direct
        data = rand_tensor(2 * ALIGN + 3, torch.uint8, seed=4)
        f.write_from(7, data)
        out = torch.empty_like(data)
        f.read_into(7, out)
        assert torch.equal(out, data)


def test_file_is_preallocated(odir):
    f = odir.new_file("pre", 3 * ALIGN + 1)
    st = os.stat(f.path)
    assert st.st_size == 4 * ALIGN and st.st_blocks * 512 >= 4 * ALIGN


def test_bad_arguments(odir):
    f = odir.new_file("bad", 100)
    with pytest.raises(ValueError, match="outside"):
        f.read_into(90, torch.empty(11, dtype=torch.uint8))
    with pytest.raises(ValueError, match="outside"):
        f.write_from(-1, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="contiguous"):
        f.read_into(0, torch.empty(4, 4)[:, 0])
    f.read_into(0, torch.empty(0))   # empty transfers are no-ops
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read_into(0, torch.empty(1, dtype=torch.uint8))


# -- concurrency -------------------------------------------------------------

@pytest.mark.parametrize("direct", [True, False])
def test_concurrent_reads_and_writes_through_pool(odir, direct):
    n_pieces, piece = 32, 3 * ALIGN + 101   # unaligned pieces sharing edge blocks
    f = odir.new_file("conc", n_pieces * piece, direct=direct)
    datas = [rand_tensor(piece, torch.uint8, seed=100 + i) for i in range(n_pieces)]
    with IOPool(8) as pool:
        for fut in [pool.submit(f.write_from, i * piece, d) for i, d in enumerate(datas)]:
            fut.result()
        outs = [torch.empty(piece, dtype=torch.uint8) for _ in range(n_pieces)]
        futs = [pool.submit(f.read_into, i * piece, o) for i, o in enumerate(outs)]
        for fut in futs:
            fut.result()
    for d, o in zip(datas, outs):
        assert torch.equal(o, d)
    whole = torch.empty(n_pieces * piece, dtype=torch.uint8)
    f.read_into(0, whole)
    assert torch.equal(whole, torch.cat(datas))


def test_io_pool_overlaps_with_main_thread():
    started, release = threading.Event(), threading.Event()
    with IOPool(2) as pool:
        fut = pool.submit(lambda: (started.set(), release.wait(5))[1])
        assert started.wait(5)
        assert not fut.done()   # main thread is free while the pool works
        release.set()
        assert fut.result() is True


# -- offload directory ---------------------------------------------------------

def test_offload_dir_close_removes_everything(tmp_path):
    d = OffloadDir(tmp_path / "parent")   # parent created on demand
    assert os.path.isdir(d.path) and os.path.dirname(d.path) == str(tmp_path / "parent")
    f = d.new_file("w.bin", 5 * ALIGN)
    f.write_from(0, torch.ones(10))
    assert d.free_bytes() > 0
    d.close()
    assert not os.path.exists(d.path) and f.closed and d.closed
    d.close()   # twice is harmless
    with pytest.raises(ValueError):
        d.new_file("x", 1)


def test_offload_dir_names_and_context(tmp_path):
    with OffloadDir(tmp_path) as d:
        for bad in ["", ".", "..", "a/b", "../x"]:
            with pytest.raises(ValueError):
                d.new_file(bad, 1)
        d.new_file("a", 1)
        with pytest.raises(FileExistsError):
            d.new_file("a", 1)
    assert not os.path.exists(d.path)


def test_offload_dir_removed_when_unreferenced(tmp_path):
    d = OffloadDir(tmp_path)
    path = d.path
    f = d.new_file("w", ALIGN)
    del d
    gc.collect()
    assert os.path.isdir(path)   # a live file keeps its directory
    del f
    gc.collect()
    assert not os.path.exists(path)


CHILD = r"""
import signal, sys, time, torch
# a suite started from a background job hands its children SIGINT ignored; the test is of
# an interactive process, where Python raises KeyboardInterrupt
signal.signal(signal.SIGINT, signal.default_int_handler)
from tiergen.disk import OffloadDir
d = OffloadDir(sys.argv[1])
f = d.new_file("weights.bin", 3 * 4096 + 17)
f.write_from(5, torch.arange(100, dtype=torch.float32))
print(d.path, flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Two children started at once (each imports torch), one to SIGTERM and
    one to SIGINT. Maps name -> (process, its dir)."""
    parent = str(tmp_path_factory.mktemp("children"))
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = {name: subprocess.Popen([sys.executable, "-c", CHILD, parent], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ["term", "int"]}
    out = {}
    try:
        for name, p in procs.items():
            line = p.stdout.readline().strip()
            assert line, p.stderr.read()
            out[name] = (p, line)
        yield out
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()


@pytest.mark.parametrize("name,sig", [("term", signal.SIGTERM), ("int", signal.SIGINT)])
def test_offload_dir_removed_on_signal(children, name, sig):
    """SIGTERM (default action: die) is handled by removing the directory and
    dying of the signal again. SIGINT raises KeyboardInterrupt as before; the
    handler leaves the directory to atexit, so this also tests removal at exit."""
    p, path = children[name]
    assert os.path.isfile(os.path.join(path, "weights.bin"))
    p.send_signal(sig)
    assert p.wait(timeout=30) == -sig   # still dies of the signal
    assert not os.path.exists(path)
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in p.stderr.read()


# -- full disk -----------------------------------------------------------------

def test_disk_full_at_preallocation(odir, monkeypatch):
    def full(fd, off, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError) as ei:
        odir.new_file("big", 10 ** 9)
    e = ei.value
    assert isinstance(e, TiergenError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    msg = str(e)
    assert odir.path in msg and str(_round_up(10 ** 9)) in msg and "\n" not in msg
    assert os.listdir(odir.path) == []   # the half-made file is gone


def test_disk_full_at_write(odir, monkeypatch):
    f = odir.new_file("w", 4 * ALIGN)

    def full(fd, bufs, pos):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "pwritev", full)
    with pytest.raises(DiskFullError, match=str(3 * ALIGN)):
        f.write_from(0, torch.zeros(3 * ALIGN, dtype=torch.uint8))


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# -- link counters ---------------------------------------------------------------

def test_link_counter_is_thread_safe():
    c = LinkCounter()

    def work():
        for _ in range(1000):
            c.add("disk->cpu", 3)
            c.add("cpu->gpu", 1)
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = c.snapshot()
    assert snap == {"disk->cpu": 24000, "cpu->gpu": 8000}
    snap["disk->cpu"] = 0   # a copy, not the live dict
    assert c.snapshot()["disk->cpu"] == 24000
    c.reset()
    assert c.snapshot() == {}
    with pytest.raises(ValueError):
        c.add("x", -1)
