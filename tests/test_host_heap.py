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


_FAULTS = """
import resource, sys, torch
from tiergen import host_heap
if sys.argv[1] == "reuse":
    assert host_heap.reuse_freed_blocks()
n = 40 << 20   # over glibc's default mmap ceiling (32 MiB): by default mapped afresh each time
for _ in range(3):
    t = torch.ones(n, dtype=torch.uint8)
    del t
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    t = torch.ones(n, dtype=torch.uint8)   # touches every page
    del t
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_reused_blocks_are_not_faulted_in_again():
    # in fresh interpreters: how glibc places blocks depends on everything the process did before
    import subprocess
    import sys
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "reuse")}
    pages = (40 << 20) // host_heap._PAGE
    assert faults["default"] > 2 * pages          # five fresh mappings: 5 x 10,240 faults
    assert faults["reuse"] < pages // 4           # the freed block serves the next allocation


def test_the_heap_may_keep_a_pass_worth_of_scratch_within_the_budget(hf_model_dirs):
    from tiergen import LLM, SamplingParams
    _, path = hf_model_dirs("llama_gqa")
    llm = LLM(path, dtype="float32", batch_size=4)
    llm.generate(prompt_token_ids=[[1, 2, 3]] * 4, params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert llm.engine.heap_limit >= host_heap.GROWTH_LIMIT
    # under a cap with little headroom the heap keeps no more than the default growth
    from tiergen.memory_plan import block_demand
    demand = block_demand(llm.config, llm.dtype, llm.policy, llm.device, 4, 1, 3, 2)
    assert llm.tiers.host_headroom(demand) <= llm.tiers.gpu.budget
    tight = LLM(path, dtype="float32", batch_size=4, gpu_mem=llm.tiers.gpu.current + (1 << 20))
    tight.generate(prompt_token_ids=[[1, 2, 3]] * 4, params=SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert tight.engine.heap_limit == host_heap.GROWTH_LIMIT
