"""Freed host memory that glibc hoards in its heap is handed back to the OS."""
import pytest
import torch

from tiergen import host_heap

pytestmark = pytest.mark.skipif(host_heap._LIBC is None or host_heap.anon_resident() == 0,
                                reason="needs glibc and /proc")


def test_fragmented_frees_are_returned():
    host_heap.release()
    big = torch.ones(24 << 20, dtype=torch.uint8)   # freeing an mmapped chunk raises glibc's threshold
    del big
    host_heap.release()
    start = host_heap.anon_resident()
    assert not host_heap.release_if_grown()
    kept, freed = [], []
    for i in range(40):   # 10 MiB chunks now come from the heap; free every other one
        t = torch.ones(10 << 20, dtype=torch.uint8)
        (freed if i % 2 else kept).append(t)
    del freed[:]
    grown = host_heap.anon_resident()
    assert grown - start > 350 << 20           # 200 MiB live, 200 MiB freed but still resident
    assert host_heap.release_if_grown()
    after = host_heap.anon_resident()
    assert grown - after > 150 << 20           # the freed pages really left the process
    assert after - start > 190 << 20           # the live ones did not
    assert not host_heap.release_if_grown()    # live memory is the new floor: no trim again
    assert sum(int(t[0]) for t in kept) == 20


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _anon_huge() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("AnonHugePages:"))


def test_huge_empty_is_aligned_usable_and_outlives_its_maker():
    small = host_heap.huge_empty((4, 3, 8, 64), torch.bfloat16)
    assert small.shape == (4, 3, 8, 64) and small.dtype == torch.bfloat16
    before = _anon_huge()
    t = host_heap.huge_empty((256, 3, 128, 64), torch.bfloat16)    # 12 MiB: the KV rows of one layer
    assert t.shape == (256, 3, 128, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % host_heap.HUGE_PAGE == 0
    t.fill_(1.5)
    col = t[:, :, 5]
    del t
    import gc
    gc.collect()
    assert float(col.float().sum()) == 1.5 * 256 * 3 * 64     # the mapping lives while a view does
    if _thp_mode() in ("madvise", "always"):
        assert _anon_huge() - before >= 4 * host_heap.HUGE_PAGE   # backed by 2 MiB pages


def _can_populate() -> bool:
    import mmap
    mm = mmap.mmap(-1, 1 << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(host_heap.MADV_POPULATE_WRITE)
        return True
    except OSError:
        return False
    finally:
        mm.close()


@pytest.mark.skipif(not _can_populate(), reason="this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
def test_huge_empty_is_resident_before_first_touch():
    before = host_heap.anon_resident()
    t = host_heap.huge_empty((64, 1 << 20), torch.uint8)     # 64 MiB, never written
    grown = host_heap.anon_resident() - before
    assert grown >= 60 << 20, grown
    del t
