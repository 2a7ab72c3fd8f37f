"""dtype="auto" on a CPU: the instruction set decides where it can, a once-per-machine
timing of the engine's product decides where it cannot, and that timing is kept."""
import json

import pytest
import torch

from tiergen import cpu_dtype


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache dir and no remembered answer."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_dtype.faster_cpu_dtype.cache_clear()
    yield tmp_path
    cpu_dtype.faster_cpu_dtype.cache_clear()


def fake_cpu(monkeypatch, flags: str, rates: dict[torch.dtype, float]) -> list[torch.dtype]:
    timed: list[torch.dtype] = []
    monkeypatch.setattr(cpu_dtype.kernels, "cpu_flags", lambda: "flags\t\t: fpu " + flags)

    def rate(dt, min_s=0.15):
        timed.append(dt)
        return rates[dt]
    monkeypatch.setattr(cpu_dtype, "product_rate", rate)
    return timed


@pytest.mark.parametrize("flags,rates,want,probed", [
    ("avx512f amx_bf16 avx512_bf16", {}, torch.bfloat16, False),
    ("avx2 fma", {}, torch.float32, False),
    ("avx512f avx512_bf16", {torch.float32: 200.0, torch.bfloat16: 430.0}, torch.bfloat16, True),
    ("avx512f avx512_bf16", {torch.float32: 315.0, torch.bfloat16: 171.0}, torch.float32, True),
    # faster, but not by enough to pay bfloat16's precision
    ("avx512f avx512_bf16", {torch.float32: 200.0, torch.bfloat16: 240.0}, torch.float32, True),
])
def test_choice(fresh, monkeypatch, flags, rates, want, probed):
    timed = fake_cpu(monkeypatch, flags, rates)
    assert cpu_dtype.faster_cpu_dtype() == want
    assert bool(timed) == probed


def test_measured_once_per_machine_and_kept(fresh, monkeypatch):
    timed = fake_cpu(monkeypatch, "avx512f avx512_bf16", {torch.float32: 200.0, torch.bfloat16: 430.0})
    assert cpu_dtype.faster_cpu_dtype() == torch.bfloat16
    cpu_dtype.faster_cpu_dtype.cache_clear()
    assert cpu_dtype.faster_cpu_dtype() == torch.bfloat16   # a new process: read, not timed
    assert timed == [torch.float32, torch.bfloat16]
    (rec,) = json.loads((fresh / "tiergen" / "cpu_dtype.json").read_text()).values()
    assert rec == {"dtype": "bfloat16", "float32_gflops": 200.0, "bfloat16_gflops": 430.0}
    # another CPU sharing the cache is timed on its own
    fake_cpu(monkeypatch, "avx512f avx512_bf16 vaes", {torch.float32: 315.0, torch.bfloat16: 171.0})
    cpu_dtype.faster_cpu_dtype.cache_clear()
    assert cpu_dtype.faster_cpu_dtype() == torch.float32


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"dtype": "int8"}}'])
def test_a_damaged_record_is_measured_again(fresh, monkeypatch, content):
    timed = fake_cpu(monkeypatch, "avx512f avx512_bf16", {torch.float32: 200.0, torch.bfloat16: 430.0})
    monkeypatch.setattr(cpu_dtype, "_machine_key", lambda: "KEY")
    path = fresh / "tiergen" / "cpu_dtype.json"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert cpu_dtype.faster_cpu_dtype() == torch.bfloat16
    assert timed and json.loads(path.read_text())["KEY"]["dtype"] == "bfloat16"


def test_an_unwritable_cache_still_answers(fresh, monkeypatch):
    fake_cpu(monkeypatch, "avx512f avx512_bf16", {torch.float32: 200.0, torch.bfloat16: 430.0})
    (fresh / "tiergen").write_text("a file where the cache dir should be")
    assert cpu_dtype.faster_cpu_dtype() == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_probe_times_a_real_product(dtype):
    assert cpu_dtype.product_rate(dtype, min_s=0.01) > 0.1
