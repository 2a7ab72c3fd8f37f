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
