"""Cost model: monotonic sanity, memory as the runtime accounts it, profile files, plan CLI."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from tiergen.config import ModelConfig
from tiergen.errors import TiergenError
from tiergen.memory_plan import block_demand, weight_demand
from tiergen.policy import Policy
from tiergen.policy.cost_model import CostModel, Workload
from tiergen.policy.profile import (DeviceRates, HardwareProfile, ProfileError, load_profile, profile_from_dict,
                                    roofline_table, save_profile, t4_paper_profile)
from tiergen.policy.search import fits, tiers_for_profile

GiB = 1 << 30


def cpu_profile(**kw) -> HardwareProfile:
    t = roofline_table(100e9, 20e9)
    rates = DeviceRates(matmul={"bfloat16": t, "float32": t.scaled(0.5)}, attn_decode_Bps=5e9,
                        attn_prefill_flops=30e9, elementwise_Bps=4e9, op_overhead_s=5e-6, dequant_Bps=1e9,
                        layer_overhead_s={"llama": 3e-4, "opt": 2e-4})
    base = dict(name="test-cpu", device="cpu", gpu_mem=8 * GiB, cpu_mem=8 * GiB, disk=100 * GiB,
                disk_read_Bps=1e9, disk_write_Bps=0.8e9, compute=rates, host=rates,
                io_slows_compute=1.2, compute_slows_io=1.1)
    return HardwareProfile(**(base | kw))


POLICIES = [
    Policy(gpu_batch_size=8),
    Policy.from_percent([0, 30, 0, 50, 0, 100], gpu_batch_size=16, num_gpu_batches=2),
    Policy.from_percent([20, 30, 50, 0, 100, 0], gpu_batch_size=8, num_gpu_batches=4, cpu_attention=True),
    Policy.from_percent([0, 0, 0, 0, 0, 100], gpu_batch_size=4, schedule="row", overlap=False),
    Policy.from_percent([0, 50, 0, 100, 0, 100], gpu_batch_size=32, compress_weight=True, compress_cache=True),
]
MODELS = ["opt-1.3b", "smollm2-135m"]


def scaled_rates(r: DeviceRates, k: float) -> DeviceRates:
    return dataclasses.replace(r, matmul={d: t.scaled(k) for d, t in r.matmul.items()},
                               attn_decode_Bps=r.attn_decode_Bps * k, attn_prefill_flops=r.attn_prefill_flops * k,
                               elementwise_Bps=r.elementwise_Bps * k, dequant_Bps=r.dequant_Bps * k,
                               op_overhead_s=r.op_overhead_s / k,
                               layer_overhead_s={f: v / k for f, v in r.layer_overhead_s.items()})


def predictions(prof: HardwareProfile, model: str, dtype: torch.dtype) -> list[float]:
    cm = CostModel(ModelConfig.from_name(model), dtype, prof, Workload(64, 8))
    return [cm.predict(p).throughput for p in POLICIES]


def baseline(make, model: str) -> tuple[HardwareProfile, torch.dtype, list[float]]:
    """A profile, the dtype it runs, and its predictions for POLICIES."""
    prof = make()
    dtype = torch.float16 if prof.device == "cuda" else torch.bfloat16
    return prof, dtype, predictions(prof, model, dtype)


def assert_never_slower(better: HardwareProfile, before: list[float], model: str, dtype: torch.dtype,
                        what: str) -> None:
    for a, b in zip(predictions(better, model, dtype), before):
        assert a >= b * (1 - 1e-12), what


@pytest.mark.parametrize("make", [cpu_profile, t4_paper_profile])
@pytest.mark.parametrize("model", MODELS)
def test_more_bandwidth_never_predicts_slower(make, model):
    prof, dtype, before = baseline(make, model)
    for field in ("disk_read_Bps", "disk_write_Bps", "h2d_pinned_Bps", "d2h_pinned_Bps"):
        v = getattr(prof, field)
        if v == float("inf"):
            continue
        assert_never_slower(dataclasses.replace(prof, **{field: v * 2}), before, model, dtype, field)


@pytest.mark.parametrize("make", [cpu_profile, t4_paper_profile])
@pytest.mark.parametrize("model", MODELS)
def test_more_compute_never_predicts_slower(make, model):
    prof, dtype, before = baseline(make, model)
    for which in ("compute", "host"):
        faster = dataclasses.replace(prof, **{which: scaled_rates(getattr(prof, which), 2.0)})
        assert_never_slower(faster, before, model, dtype, which)
    # less contention between compute and disk never hurts either
    calm = dataclasses.replace(prof, io_slows_compute=1.0, compute_slows_io=1.0)
    assert_never_slower(calm, before, model, dtype, "contention")


def test_disk_offload_is_predicted_slower_than_ram():
    cm = CostModel(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, cpu_profile(), Workload(32, 8))
    ram = cm.predict(Policy(gpu_batch_size=16)).throughput
    disk = cm.predict(Policy.from_percent([0, 0, 0, 100, 0, 100], gpu_batch_size=16)).throughput
    assert disk < ram


def test_lm_head_on_disk_takes_its_turn_on_the_disk():
    """A disk-bound pass reads the layers' and the lm_head's bytes from one disk: its
    time is at least all those bytes over the read rate, whatever the overlap."""
    prof = cpu_profile(io_slows_compute=1.0, compute_slows_io=1.0)
    cm = CostModel(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, prof, Workload(32, 8))
    pol = Policy.from_percent([0, 30, 0, 100, 0, 100], gpu_batch_size=4)
    x = cm.fractions(pol)
    assert x["head_disk"] == 1.0                     # the tied lm_head is placed on disk whole
    dec = cm.predict(pol).decode
    layers = cm.cfg.num_layers * cm.pass_terms(pol, 1, 36)["disk"](x)
    head = cm.head_terms(pol, x)["disk"](x)
    assert head > 0 and dec.disk == pytest.approx(layers + head)
    assert dec.total >= layers + head


def test_memory_is_what_the_runtime_accounts():
    cfg = ModelConfig.from_name("opt-1.3b")
    cm = CostModel(cfg, torch.bfloat16, cpu_profile(), Workload(32, 8))
    pol = POLICIES[1]
    w = weight_demand(cm.model, torch.bfloat16, pol, torch.device("cpu"))
    b = block_demand(cfg, torch.bfloat16, pol, torch.device("cpu"), 16, 2, 32, 8)
    want = {t: sum(w[t].values()) + sum(b[t].values()) for t in ("gpu", "cpu", "disk")}
    assert cm.memory(pol) == want
    # and the affine form the LP uses agrees at the corner placements
    aff = cm.memory_affine(pol)
    for corner in (Policy(gpu_batch_size=16, num_gpu_batches=2),
                   Policy.from_percent([0, 100, 0, 100, 0, 100], gpu_batch_size=16, num_gpu_batches=2)):
        x = cm.fractions(corner)
        got = {t: aff[t](x) for t in aff}
        exact = cm.memory(corner)
        for t in exact:
            assert got[t] == pytest.approx(exact[t], rel=1e-6, abs=1)


def test_over_budget_policy_is_infeasible():
    prof = cpu_profile(gpu_mem=1 * GiB, cpu_mem=1 * GiB)
    cm = CostModel(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, prof, Workload(32, 8))
    tiers = tiers_for_profile(prof)
    assert not fits(tiers, cm, Policy(gpu_batch_size=8))                 # 2.6 GB of weights in 1 GiB
    assert fits(tiers, cm, Policy.from_percent([0, 0, 0, 0, 0, 100], gpu_batch_size=8))


def test_profile_json_round_trip(tmp_path):
    for p in (cpu_profile(), t4_paper_profile()):
        path = tmp_path / f"{p.name}.json"
        save_profile(p, path)
        assert load_profile(path) == p


@pytest.mark.parametrize("text,msg", [
    ("{not json", "not valid JSON"),
    ('{"name": "x"}', "lacks the field"),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_profile_is_a_one_line_error(tmp_path, text, msg):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ProfileError, match=msg) as e:
        load_profile(path)
    assert isinstance(e.value, TiergenError) and "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="no such profile"):
        load_profile(tmp_path / "missing.json")
    d = cpu_profile().to_dict()
    d["disk_read_Bps"] = -1
    with pytest.raises(ProfileError, match="disk_read_Bps"):
        profile_from_dict(d)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tiergen.cli", *args], capture_output=True, text=True, timeout=120)


def test_plan_cli_prints_a_policy(tmp_path):
    r = _cli("plan", "--model", "opt-175b", "--profile", "benchmarks/profiles/t4_paper.json", "--max-block", "64")
    assert r.returncode == 0, r.stderr
    assert "policy: --gpu-batch-size" in r.stdout and "predicted throughput" in r.stdout
    assert "bottleneck" in r.stdout
    r = _cli("plan", "--model", "opt-1.3b", "--profile", "benchmarks/profiles/t4_paper.json", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["throughput"] > 0


def test_plan_cli_bad_profile_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"device": "tpu"}')
    for path in (bad, tmp_path / "missing.json"):
        r = _cli("plan", "--model", "opt-1.3b", "--profile", str(path))
        assert r.returncode == 1
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tiergen: error:"), r.stderr
