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
(memory_plan demand through ``Tiers.check_fits``) accepts it under the budgets
less their reserve. A rounded solution that overshoots a budget (whole tensors
and rows land on either side of the LP's fractions) is repaired: the LP is
solved again with that budget lowered by the overshoot, then, failing that,
weight, cache and activation shares are pushed down a tier.

The reserve is for estimation error only, not a flat share of every budget: a
budget the caller set exactly (``--gpu-mem 0.45GiB``) is the very number the
runtime checks the very same bytes against, so nothing is held back from it
(the exact check after rounding is what keeps a policy inside it); a measured
one (free RAM, free GPU memory, free disk, and on a CPU-only machine the host
RAM both tiers share) is measured again when the runtime starts, and moves in
between (``MEASURED_MARGIN``). On a CPU-only box the "gpu" tier is mostly the
fixed streamed-weight buffers, so a 10 % reserve of it left room for 2-row
micro-batches only (BENCHMARKS.md §5). The host RAM also has to hold what the
runtime does not account at all (a forward pass's transients, what the
allocator keeps of them): ``HOST_MARGIN``.

Among policies predicted within NEAR of the fastest, the search takes the one
that stays fastest if I/O is IO_DOUBT times slower than profiled (the model's
largest errors), then the smallest block.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import InvalidRequestError, PolicyDoesNotFitError, PromptTooLongError, TiergenError
from ..memory_plan import block_demand, merged
from .cost_model import VARS, Affine, CostModel, Prediction, Workload
from .policy import Policy
from .profile import HardwareProfile

BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
NUM_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)
NEAR = 0.98     # predictions closer than this to the best are a tie
IO_DOUBT = 2.0  # ties are broken by the prediction with I/O this many times slower than profiled
# Share of a budget kept free, by how well the search knows it (module docstring).
EXACT_MARGIN = 0.0      # set by the caller: the runtime checks the same bytes against the same number
# Measured (free memory, free disk, the shared host RAM): measured again when the runtime
# starts. Under BENCHMARKS.md §5's 2 GiB cgroup the host limit fell by 70 MiB of 1.75 GiB
# between the search and the LLM (imports, page cache charged to the cgroup).
MEASURED_MARGIN = 0.06
# On a CPU-only machine the host RAM both tiers share must also hold what the runtime does
# not account (a forward pass's transients, what the allocator keeps of them, Python
# objects). Under §5's 2 GiB cap that was 0.4-0.5 GiB beyond the accounted bytes and the
# process itself, whatever the block: a run with 1.1 GiB accounted peaked at 1.9 GiB, and
# two auto runs that filled the host to a 6 % reserve (1.35-1.45 GiB) were OOM-killed.
HOST_MARGIN = 0.30
CONSTRAINTS = ("gpu", "cpu", "disk", "host")   # host: gpu + cpu on a CPU-only machine
MARGIN = {"gpu": MEASURED_MARGIN, "cpu": MEASURED_MARGIN, "disk": MEASURED_MARGIN, "host": HOST_MARGIN}
# (the default when the caller does not say which budgets are exact)


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
    return merged(w, b)


def fits(tiers, cm: CostModel, policy: Policy) -> bool:
    try:
        tiers.check_fits(demand(cm, policy))
        return True
    except PolicyDoesNotFitError:
        return False


def margins_for(margin: float | Mapping[str, float]) -> dict[str, float]:
    """A reserve per constraint (gpu, cpu, disk, host) from one number or a partial mapping
    (unnamed: MEASURED_MARGIN, the host HOST_MARGIN)."""
    if isinstance(margin, Mapping):
        return {c: float(margin.get(c, HOST_MARGIN if c == "host" else MEASURED_MARGIN)) for c in CONSTRAINTS}
    return {c: float(margin) for c in CONSTRAINTS}


def reserved(tiers, margin: float | Mapping[str, float]):  # -> Tiers
    """A copy of ``tiers`` whose free bytes are cut by each constraint's reserve: a policy
    that passes its check_fits passes the runtime's own with that much to spare."""
    from ..tiers import Tier
    m = margins_for(margin)
    out = copy.copy(tiers)
    for name in ("gpu", "cpu", "disk"):
        t = tiers[name]
        keep = int(m[name] * max(0, t.budget - t.current))
        setattr(out, name, Tier(name, t.budget - keep, t.current))
    if tiers.shared_host:
        free = tiers.host_limit - tiers.gpu.current - tiers.cpu.current
        out.host_limit = tiers.host_limit - int(m["host"] * max(0, free))
    return out


def overshoot(tiers, cm: CostModel, policy: Policy) -> dict[str, int]:
    """Bytes by which the policy's demand exceeds each constraint of ``tiers`` (none: it fits)."""
    d = {t: sum(v.values()) for t, v in demand(cm, policy).items()}
    over = {t: d.get(t, 0) - (tiers[t].budget - tiers[t].current) for t in ("gpu", "cpu", "disk")}
    if tiers.shared_host:
        over["host"] = d.get("gpu", 0) + d.get("cpu", 0) - (tiers.host_limit - tiers.gpu.current
                                                             - tiers.cpu.current)
    return {t: n for t, n in over.items() if n > 0}


def _row(a: Affine) -> tuple[np.ndarray, float]:
    return np.array([a.coef.get(v, 0.0) for v in VARS] + [0.0, 0.0]), a.const


def solve_lp(cm: CostModel, policy: Policy, budgets: dict[str, float], shared_host: float | None,
             margin: float = 0.0) -> dict[str, float] | None:
    """Best fractions for this block shape and flags, or None if nothing fits the budgets
    (bytes free per tier; ``shared_host``: free host RAM both tiers share) less ``margin``."""
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


def _push_down(g: float, c: float, step: float, over: set[str]) -> tuple[float, float]:
    """Shares (gpu, cpu) with ``step`` points moved from each over-budget tier to the next one down."""
    if "gpu" in over or "host" in over:
        moved = min(step, g)
        g, c = g - moved, c + moved
    if "cpu" in over or "host" in over:
        c = max(0.0, c - step)
    return g, min(c, 100.0 - g)


def _repairs(p: Policy, over: set[str]) -> Iterable[Policy]:
    """Policies with ever more weight, cache and activation shares pushed from the tiers
    that overshoot to the next tier down (rounding and whole-tensor placement can
    overshoot a budget the LP respected)."""
    for step in (2, 5, 10, 20, 35, 50, 100):
        wg, wc = _push_down(p.w_gpu_percent, p.w_cpu_percent, step, over)
        cg, cc = _push_down(p.cache_gpu_percent, p.cache_cpu_percent, step, over)
        ag = p.act_gpu_percent
        if "gpu" in over:
            ag = max(0.0, ag - step)     # activations have no disk share: gpu -> cpu only
        yield replace(p, w_gpu_percent=wg, w_cpu_percent=wc, cache_gpu_percent=cg, cache_cpu_percent=cc,
                      act_gpu_percent=ag, act_cpu_percent=100.0 - ag)


LP_RETRIES = 4


def fit_block(cm: CostModel, pol: Policy, rt, log: Callable[[str], None] | None = None) -> Policy | None:
    """The LP's policy for this block shape and flags, rounded to what the runtime places
    and checked (``rt``: the tiers less their reserve) exactly; repaired if it overshoots."""
    budgets = {t: float(rt[t].budget - rt[t].current) for t in ("gpu", "cpu", "disk")}
    shared = float(rt.host_limit - rt.gpu.current - rt.cpu.current) if rt.shared_host else None
    cand = None
    for _ in range(LP_RETRIES):
        x = solve_lp(cm, pol, budgets, shared)
        if x is None:
            break
        cand = to_policy(pol, x)
        over = overshoot(rt, cm, cand)
        if not over:
            return cand
        # whole tensors / rows landed above the LP's fractions: ask again for that much less
        for t, n in over.items():
            if t == "host":
                shared -= n
            else:
                budgets[t] -= n
    if cand is None:
        return None
    over = set(overshoot(rt, cm, cand))
    for rep in _repairs(cand, over):
        if not overshoot(rt, cm, rep):
            return rep
    if log:
        log(f"{pol.gpu_batch_size}x{pol.num_gpu_batches}: rounded LP policy {cand.percent} over {sorted(over)}; dropped")
    return None


def slow_io(profile: HardwareProfile, k: float = IO_DOUBT) -> HardwareProfile:
    """The profile with every disk and host<->device rate divided by ``k``."""
    names = ("disk_read_Bps", "disk_write_Bps", "h2d_pinned_Bps", "h2d_pageable_Bps", "d2h_pinned_Bps",
             "d2h_pageable_Bps")
    return replace(profile, **{n: getattr(profile, n) / k for n in names})


def _pick(found: list[Plan], doubt: CostModel) -> Plan:
    """Among policies predicted within NEAR of the fastest, the one that stays fastest if
    I/O runs IO_DOUBT times slower than profiled (the model's largest errors are
    disk-heavy decode: BENCHMARKS.md §5), then the smallest block: less memory and
    latency for a gain the model cannot promise."""
    top = max(p.prediction.throughput for p in found)
    near = [p for p in found if p.prediction.throughput >= NEAR * top]
    if len(near) == 1:
        return near[0]
    slow = {id(p): doubt.predict(p.policy).throughput for p in near}
    top_slow = max(slow.values())
    return min((p for p in near if slow[id(p)] >= NEAR * top_slow),
               key=lambda p: (p.policy.block_size, -p.prediction.throughput))


def search(cfg: ModelConfig, dtype: torch.dtype, profile: HardwareProfile, workload: Workload, tiers, *,
           margin: float | Mapping[str, float] = MARGIN, batch_sizes: Iterable[int] = BATCH_SIZES,
           num_batches: Iterable[int] = NUM_BATCHES, max_block: int | None = None,
           compress: bool = False, base: Policy | None = None,
           accept: Callable[[Policy], bool] | None = None,
           log: Callable[[str], None] | None = None, store: torch.dtype | None = None) -> Plan:
    """The predicted-fastest policy that the runtime accepts under ``tiers``' budgets.

    ``margin``: the share of each budget kept free (one number, or per constraint
    "gpu", "cpu", "disk", "host"; unnamed ones as in margins_for). ``accept``: a
    further condition every returned policy must meet."""
    if max_block is not None and max_block < 1:
        raise InvalidRequestError(f"the largest block must be at least 1 sequence, got {max_block}")
    if workload.prompt_len + workload.gen_len > cfg.context_length:
        raise PromptTooLongError(f"a prompt of {workload.prompt_len} tokens and {workload.gen_len} new ones do not "
                                 f"fit the model's context of {cfg.context_length}")
    cm = CostModel(cfg, dtype, profile, workload, store)
    rt = reserved(tiers, margin)
    budgets = {t: float(rt[t].budget - rt[t].current) for t in ("gpu", "cpu", "disk")}
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
                if max_block is not None and b * K > max_block:
                    continue
                pol = replace(base, gpu_batch_size=b, num_gpu_batches=K, **flags)
                tried += 1
                cand = fit_block(cm, pol, rt, log)
                if cand is None or (accept is not None and not accept(cand)):
                    continue
                feasible += 1
                pred = cm.predict(cand)
                if log:
                    log(f"{b}x{K} {flags} -> {cand.percent} {pred.throughput:.3f} tok/s")
                found.append(Plan(cand, pred, 0, 0))
    if found:
        best = _pick(found, CostModel(cfg, dtype, slow_io(profile), workload, store))
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
                base: Policy | None = None, margin: float | Mapping[str, float] = MARGIN,
                accept: Callable[[Policy], bool] | None = None, store: torch.dtype | None = None) -> Plan:
    """policy="auto": the search on this machine's cached profile under ``tiers``' budgets."""
    from .profile import cached_profile
    wl = workload or AUTO_WORKLOAD
    ctx = cfg.context_length
    if workload is None and wl.prompt_len + wl.gen_len > ctx:   # the default, fitted to a short context
        wl = Workload(max(1, ctx - wl.gen_len), min(wl.gen_len, ctx - 1))
    prof = profile or cached_profile(device=tiers.device.type)
    return search(cfg, dtype, prof, wl, tiers, max_block=max_block, base=base, margin=margin, accept=accept,
                  store=store)


def auto_margins(gpu_mem, cpu_mem, disk) -> dict[str, float]:
    """Budgets the caller set are exact; the others, and the shared host RAM, are measured."""
    return {"gpu": EXACT_MARGIN if gpu_mem is not None else MEASURED_MARGIN,
            "cpu": EXACT_MARGIN if cpu_mem is not None else MEASURED_MARGIN,
            "disk": EXACT_MARGIN if disk is not None else MEASURED_MARGIN,
            "host": HOST_MARGIN}


def resolve_auto(policy: str, model: str, *, dtype=None, device=None, dummy: bool = False, seed: int = 0,
                 gpu_mem=None, cpu_mem=None, disk=None, offload_dir: str | None = None,
                 workload: Workload | None = None, base: Policy | None = None,
                 max_block: int | None = AUTO_MAX_BLOCK, offload_dtype=None) -> Policy:
    """What LLM(model, policy="auto", ...) runs: the model's shape, the same budgets the
    LLM will hold, this machine's profile.

    The dtype is the one the LLM will run: with none given it tries float32 on a CPU
    and falls back to bfloat16 when float32's weights do not fit (LLM.__init__), so
    when no float32 policy fits, the plan is a bfloat16 one for which that fallback
    surely happens (its float32 weights do not fit)."""
    from ..errors import InvalidRequestError
    from ..llm import resolve_device, resolve_dtype, resolve_store_dtype
    from ..memory_plan import weight_demand
    from ..tiers import Tiers, parse_bytes
    from ..weights.source import resolve
    if policy != "auto":
        raise InvalidRequestError(f"policy must be a tiergen.Policy or 'auto', got {policy!r}")
    import scipy.optimize  # noqa: F401  (the LP's libraries: in the RAM measured free here, as in the LLM's)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    src = resolve(model, dummy=dummy, seed=seed)
    cfg = src.config
    budgets = [parse_bytes(x) for x in (gpu_mem, cpu_mem, disk)]
    tiers = Tiers(dev, *budgets, offload_dir)
    margin = auto_margins(*budgets)
    try:
        return auto_policy(cfg, dt, tiers, workload, max_block=max_block, base=base, margin=margin,
                           store=resolve_store_dtype(offload_dtype, src.dtype, dt)).policy
    except NoFeasiblePolicyError:
        if dtype not in (None, "auto") or dt != torch.float32:
            raise
    # LLM's own fallback: bfloat16, taken when float32's weights do not fit
    from ..models import get_model
    model_ = get_model(cfg)

    def falls_back(p: Policy) -> bool:
        try:
            tiers.check_fits(weight_demand(model_, torch.float32, p, dev,
                                           resolve_store_dtype(offload_dtype, src.dtype, torch.float32)))
            return False
        except PolicyDoesNotFitError:
            return True
    return auto_policy(cfg, torch.bfloat16, tiers, workload, max_block=max_block, base=base, margin=margin,
                       accept=falls_back, store=resolve_store_dtype(offload_dtype, src.dtype, torch.bfloat16)).policy
