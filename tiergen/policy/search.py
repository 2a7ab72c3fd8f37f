"""Policy search: a linear program over the placement fractions, inside a grid
search over the block shape (gpu_batch_size x num_gpu_batches) and the flags.

For a fixed block shape and flags, every resource time of the cost model and
every tier's bytes are affine in the eight fractions (cost_model docstring), so

    minimise   T_pre + (G - 1) T_dec
    subject to T_pass >= L * term(x)    for each overlap term of that pass
                                        (the head's I/O spread over the layers)
               mem_tier(x) <= (1 - margin) * budget_tier       (gpu, cpu, disk)
               mem_gpu(x) + mem_cpu(x) <= (1 - margin) * host   (no GPU: one RAM)
               w_g + w_c + w_d = 1, c_g + c_c + c_d = 1, a_g + a_c = 1, 0 <= x <= 1

is a linear program (HiGHS via scipy.optimize.linprog). Its solution is rounded
to whole percents, re-predicted with the placement the runtime really makes
(whole tensors, whole rows), and kept only if the runtime's own check
(memory_plan demand through ``Tiers.check_fits``) accepts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import PolicyDoesNotFitError, TiergenError
from ..memory_plan import block_demand
from .cost_model import VARS, Affine, CostModel, Prediction, Workload
from .policy import Policy
from .profile import HardwareProfile

BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
NEAR = 0.98     # predictions closer than this to the best are a tie
MARGIN = 0.10   # of every budget, for allocator slack, Python objects and what we did not model


class NoFeasiblePolicyError(TiergenError):
    """No policy fits the budgets."""


@dataclass(frozen=True)
class Plan:
    policy: Policy
    prediction: Prediction
    tried: int                 # block shapes x flags whose LP was solved
    feasible: int              # of those, how many gave a policy the runtime accepts


def tiers_for_profile(profile: HardwareProfile, gpu_mem: int | None = None, cpu_mem: int | None = None,
                      disk: int | None = None):  # -> Tiers
    """Budgets of a (possibly hand-written) profile's machine, as the runtime would hold them."""
    from ..tiers import Tiers
    t = Tiers(torch.device(profile.device), gpu_mem or profile.gpu_mem, cpu_mem or profile.cpu_mem,
              disk or profile.disk)
    if profile.shared_host:
        t.host_limit = cpu_mem or profile.cpu_mem
    return t


def demand(cm: CostModel, policy: Policy) -> dict[str, dict[str, int]]:
    """Weights plus one block, as the runtime accounts them (memory_plan)."""
    w = cm.weight_demand(policy)
    b = block_demand(cm.cfg, cm.dtype, policy, cm.device, policy.gpu_batch_size, policy.num_gpu_batches,
                     cm.wl.prompt_len, cm.wl.gen_len)
    out: dict[str, dict[str, int]] = {}
    for d in (w, b):
        for tier, items in d.items():
            for k, v in items.items():
                out.setdefault(tier, {})[k] = out.get(tier, {}).get(k, 0) + v
    return out


def fits(tiers, cm: CostModel, policy: Policy) -> bool:
    try:
        tiers.check_fits(demand(cm, policy))
        return True
    except PolicyDoesNotFitError:
        return False


def _row(a: Affine) -> tuple[np.ndarray, float]:
    return np.array([a.coef.get(v, 0.0) for v in VARS] + [0.0, 0.0]), a.const


def solve_lp(cm: CostModel, policy: Policy, budgets: dict[str, float], shared_host: float | None,
             margin: float = MARGIN) -> dict[str, float] | None:
    """Best fractions for this block shape and flags, or None if nothing fits."""
    from scipy.optimize import linprog
    L, P, G = cm.cfg.num_layers, cm.wl.prompt_len, cm.wl.gen_len
    n = len(VARS) + 2          # fractions, T_pre, T_dec
    A, bu = [], []

    def le(a: Affine, rhs: float, t_index: int | None = None, t_coef: float = 0.0) -> None:
        row, const = _row(a)
        if t_index is not None:
            row[t_index] = t_coef
        A.append(row)
        bu.append(rhs - const)

    for t_index, (T, S) in ((len(VARS), (P, P)), (len(VARS) + 1, (1, P + G / 2))):
        terms = cm.pass_layer_terms(policy, T, S)
        C, D, H, Gd = terms["compute"], terms["disk"], terms["h2d"], terms["d2h"]
        cands = cm.overlap_terms(C, D) + [H, Gd] if policy.overlap else [C + D + H + Gd]
        for term in cands:
            le(term * L, 0.0, t_index, -1.0)         # L term(x) - T <= 0
    mem = cm.memory_affine(policy)
    for tier in ("gpu", "cpu", "disk"):
        le(mem[tier], (1 - margin) * budgets[tier])
    if shared_host is not None:
        le(mem["gpu"] + mem["cpu"], (1 - margin) * shared_host)
    eq = np.zeros((3, n))
    for i, v in enumerate(VARS):
        eq["wca".index(v[0]), i] = 1.0
    cost = np.zeros(n)
    cost[len(VARS)], cost[len(VARS) + 1] = 1.0, max(G - 1, 0)
    res = linprog(cost, A_ub=np.array(A), b_ub=np.array(bu), A_eq=eq, b_eq=np.ones(3),
                  bounds=[(0, 1)] * len(VARS) + [(0, None)] * 2, method="highs")
    if res.status != 0:
        return None
    return dict(zip(VARS, (float(v) for v in res.x[:len(VARS)])))


def to_policy(base: Policy, x: dict[str, float]) -> Policy:
    """Whole percents; what rounding takes from a faster tier goes to the next slower one."""
    def two(g: float, c: float) -> tuple[float, float]:
        g = math.floor(g * 100 + 1e-6)
        c = math.floor((min(1.0, g / 100 + c) * 100) + 1e-6) - g
        return float(g), float(max(c, 0))
    wg, wc = two(x["w_gpu"], x["w_cpu"])
    cg, cc = two(x["c_gpu"], x["c_cpu"])
    ag = float(round(x["a_gpu"] * 100))
    return replace(base, w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                   act_gpu_percent=ag, act_cpu_percent=100.0 - ag)


def _repairs(p: Policy) -> Iterable[Policy]:
    """The rounded policy, then ones with ever more weight and cache pushed down a tier
    (rounding and whole-tensor placement can overshoot a budget the LP respected)."""
    yield p
    for step in (5, 10, 20, 35, 50):
        wg, wc = max(0.0, p.w_gpu_percent - step), p.w_cpu_percent
        wc = max(0.0, min(100 - wg, wc + min(step, p.w_gpu_percent)) - step)
        cg, cc = max(0.0, p.cache_gpu_percent - step), max(0.0, p.cache_cpu_percent - step)
        yield replace(p, w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc)


def search(cfg: ModelConfig, dtype: torch.dtype, profile: HardwareProfile, workload: Workload, tiers, *,
           margin: float = MARGIN, batch_sizes: Iterable[int] = BATCH_SIZES,
           num_batches: Iterable[int] = NUM_BATCHES, max_block: int | None = None,
           compress: bool = False, base: Policy | None = None,
           log: Callable[[str], None] | None = None) -> Plan:
    """The predicted-fastest policy that the runtime accepts under ``tiers``' budgets."""
    cm = CostModel(cfg, dtype, profile, workload)
    budgets = {t: float(tiers[t].budget - tiers[t].current) for t in ("gpu", "cpu", "disk")}
    shared = float(tiers.host_limit - tiers.gpu.current - tiers.cpu.current) if tiers.shared_host else None
    base = base or Policy()
    flag_sets = [{}]
    if profile.device == "cuda":
        flag_sets = [{"cpu_attention": False}, {"cpu_attention": True}]
    if compress:
        flag_sets = [dict(f, compress_weight=cw, compress_cache=cc)
                     for f in flag_sets for cw in (False, True) for cc in (False, True)]
    best: Plan | None = None
    found: list[Plan] = []
    tried = feasible = 0
    for flags in flag_sets:
        for K in num_batches:
            for b in batch_sizes:
                if max_block and b * K > max_block:
                    continue
                pol = replace(base, gpu_batch_size=b, num_gpu_batches=K, **flags)
                x = solve_lp(cm, pol, budgets, shared, margin)
                tried += 1
                if x is None:
                    continue
                for cand in _repairs(to_policy(pol, x)):
                    if fits(tiers, cm, cand):
                        feasible += 1
                        pred = cm.predict(cand)
                        if log:
                            log(f"{b}x{K} {flags} -> {cand.percent} {pred.throughput:.3f} tok/s")
                        found.append(Plan(cand, pred, 0, 0))
                        break
    if found:
        # Among policies within NEAR of the fastest, the smallest block: less memory and
        # latency for a gain the model cannot promise.
        top = max(p.prediction.throughput for p in found)
        best = min((p for p in found if p.prediction.throughput >= NEAR * top),
                   key=lambda p: (p.policy.block_size, -p.prediction.throughput))
    if best is None:
        raise NoFeasiblePolicyError(
            f"no policy fits the budgets (gpu {budgets['gpu']:.3g} B, cpu {budgets['cpu']:.3g} B, "
            f"disk {budgets['disk']:.3g} B) for {cfg.name or 'this model'} with prompt {workload.prompt_len} "
            f"and {workload.gen_len} new tokens")
    return replace(best, tried=tried, feasible=feasible)


# Workload LLM(policy="auto") plans for when it cannot know the prompts yet: the
# paper's benchmark shape, clipped to the model's context.
AUTO_WORKLOAD = Workload(prompt_len=512, gen_len=32)


AUTO_MAX_BLOCK = 256


def auto_policy(cfg: ModelConfig, dtype: torch.dtype, tiers, workload: Workload | None = None,
                profile: HardwareProfile | None = None, max_block: int | None = AUTO_MAX_BLOCK,
                base: Policy | None = None) -> Plan:
    """policy="auto": the search on this machine's cached profile under ``tiers``' budgets."""
    from .profile import cached_profile
    wl = workload or AUTO_WORKLOAD
    ctx = cfg.context_length
    if wl.prompt_len + wl.gen_len > ctx:
        wl = Workload(max(1, ctx - wl.gen_len), min(wl.gen_len, ctx - 1))
    prof = profile or cached_profile(device=tiers.device.type)
    return search(cfg, dtype, prof, wl, tiers, max_block=max_block, base=base)


def resolve_auto(policy: str, model: str, *, dtype=None, device=None, dummy: bool = False, seed: int = 0,
                 gpu_mem=None, cpu_mem=None, disk=None, offload_dir: str | None = None,
                 workload: Workload | None = None, base: Policy | None = None,
                 max_block: int | None = AUTO_MAX_BLOCK) -> Policy:
    """What LLM(model, policy="auto", ...) runs: the model's shape, the same budgets the
    LLM will hold, this machine's profile."""
    from ..errors import InvalidRequestError
    from ..llm import resolve_device, resolve_dtype
    from ..tiers import Tiers, parse_bytes
    from ..weights.source import resolve
    if policy != "auto":
        raise InvalidRequestError(f"policy must be a tiergen.Policy or 'auto', got {policy!r}")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = resolve(model, dummy=dummy, seed=seed).config
    tiers = Tiers(dev, parse_bytes(gpu_mem), parse_bytes(cpu_mem), parse_bytes(disk), offload_dir)
    return auto_policy(cfg, dt, tiers, workload, max_block=max_block, base=base).policy
