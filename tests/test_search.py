"""Policy search: only policies the runtime accepts, and LLM(policy="auto") wiring."""
from __future__ import annotations

import json

import pytest
import torch

from tiergen.config import ModelConfig
from tiergen.policy import Policy
from tiergen.policy.cost_model import CostModel, Workload
from tiergen.policy.profile import save_profile, t4_paper_profile
from tiergen.policy.search import NoFeasiblePolicyError, demand, search, tiers_for_profile

from test_cost_model import GiB, cpu_profile

SMALL = dict(batch_sizes=(1, 4, 16, 64), num_batches=(1, 2, 4))


@pytest.mark.parametrize("model,prof", [
    ("opt-1.3b", cpu_profile()),                                       # all fits in RAM
    ("opt-1.3b", cpu_profile(gpu_mem=int(1.6 * GiB), cpu_mem=int(1.6 * GiB))),   # must offload
    ("smollm2-135m", cpu_profile(gpu_mem=200 << 20, cpu_mem=200 << 20)),
    ("opt-30b", t4_paper_profile()),
])
def test_search_returns_policies_the_runtime_accepts(model, prof):
    cfg = ModelConfig.from_name(model)
    dtype = torch.float16 if prof.device == "cuda" else torch.bfloat16
    wl = Workload(64, 8)
    tiers = tiers_for_profile(prof)
    plan = search(cfg, dtype, prof, wl, tiers, **SMALL)
    assert isinstance(plan.policy, Policy) and plan.prediction.throughput > 0
    assert plan.feasible >= 1
    cm = CostModel(cfg, dtype, prof, wl)
    tiers.check_fits(demand(cm, plan.policy))     # raises PolicyDoesNotFitError if not
    # the margin is kept against each budget
    need = {t: sum(v.values()) for t, v in demand(cm, plan.policy).items()}
    for t in ("gpu", "cpu", "disk"):
        assert need[t] <= tiers[t].budget


def test_small_ram_sends_weights_to_disk():
    prof = cpu_profile(gpu_mem=int(1.6 * GiB), cpu_mem=int(1.6 * GiB))
    plan = search(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, prof, Workload(32, 8),
                  tiers_for_profile(prof), **SMALL)
    assert plan.policy.w_gpu_percent + plan.policy.w_cpu_percent < 100


def test_nothing_fits_is_an_error():
    prof = cpu_profile(gpu_mem=10 << 20, cpu_mem=10 << 20, disk=10 << 20)
    with pytest.raises(NoFeasiblePolicyError, match="no policy fits"):
        search(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, prof, Workload(32, 8),
               tiers_for_profile(prof), **SMALL)


def test_llm_policy_auto(tmp_path, monkeypatch):
    from tiergen import LLM
    from tiergen.policy.profile import default_profile_path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    save_profile(cpu_profile(), default_profile_path())
    llm = LLM("smollm2-135m", policy="auto", offload_dir=str(tmp_path))
    try:
        assert isinstance(llm.policy, Policy) and llm.policy.block_size <= 256
        out = llm.generate(prompt_token_ids=[[1, 2, 3]], params=None)
        assert out[0].token_ids
    finally:
        llm.close()
    with pytest.raises(Exception, match="auto"):
        LLM("smollm2-135m", policy="fastest")
