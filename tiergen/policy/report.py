"""Human-readable lines for `tiergen profile` and `tiergen plan`."""
from __future__ import annotations

import math

from ..tiers import fmt_bytes
from .profile import HardwareProfile
from .search import Plan


def _bw(x: float) -> str:
    return "-" if math.isinf(x) else f"{x / 1e9:.2f} GB/s"


def profile_lines(p: HardwareProfile) -> list[str]:
    out = [f"profile {p.name} ({p.device}) {p.measured_at}".rstrip(),
           f"memory: gpu {fmt_bytes(p.gpu_mem)}, cpu {fmt_bytes(p.cpu_mem)}, disk {fmt_bytes(p.disk)}",
           f"disk: read {_bw(p.disk_read_Bps)}, write {_bw(p.disk_write_Bps)}",
           f"host->device: pinned {_bw(p.h2d_pinned_Bps)}, pageable {_bw(p.h2d_pageable_Bps)}; "
           f"device->host: pinned {_bw(p.d2h_pinned_Bps)}, pageable {_bw(p.d2h_pageable_Bps)}",
           f"overlap: compute {p.io_slows_compute:.2f}x slower under disk I/O, "
           f"disk {p.compute_slows_io:.2f}x slower under compute"]
    for label, r in (("compute device", p.compute), ("host", p.host)):
        if label == "host" and r is p.compute:
            break
        out.append(f"{label}: decode attention {_bw(r.attn_decode_Bps)} of cache, prefill attention "
                   f"{r.attn_prefill_flops / 1e9:.0f} GFLOP/s, elementwise {_bw(r.elementwise_Bps)}, "
                   f"dequantize {_bw(r.dequant_Bps)}, op {r.op_overhead_s * 1e6:.1f} us, layer call "
                   + ", ".join(f"{k} {v * 1e6:.0f} us" for k, v in r.layer_overhead_s.items()))
        for dt, t in r.matmul.items():
            out.append(f"  matmul {dt} GFLOP/s, rows x weight size:")
            out.append("    rows " + " ".join(f"{s / 1e6:>7.2f}M" for s in t.sizes))
            for rows, line in zip(t.rows, t.flops):
                out.append(f"    {rows:4d} " + " ".join(f"{v / 1e9:8.1f}" for v in line))
    if p.notes:
        out.append(f"notes: {p.notes}")
    return out


def plan_lines(model: str, prof: HardwareProfile, plan: Plan) -> list[str]:
    pol, pr = plan.policy, plan.prediction
    wl = pr.workload
    flags = [f for f in ("cpu_attention", "compress_weight", "compress_cache") if getattr(pol, f)]
    out = [f"model {model} on {prof.name} ({prof.device}), prompt {wl.prompt_len}, gen {wl.gen_len}; "
           f"{plan.tried} block shapes x flags searched, {plan.feasible} feasible",
           f"policy: --gpu-batch-size {pol.gpu_batch_size} --num-gpu-batches {pol.num_gpu_batches} "
           f"--percent {' '.join(f'{x:g}' for x in pol.percent)}"
           + "".join(f" --{f.replace('_', '-')}" for f in flags),
           f"predicted throughput {pr.throughput:.3f} tok/s (block {pol.block_size}: prefill {pr.prefill_s:.2f} s, "
           f"decode {pr.decode_s:.2f} s = {wl.gen_len - 1} steps of {pr.decode.total:.3f} s)",
           "time per pass (s)     compute      disk   cpu->gpu   gpu->cpu     total"]
    for name, c in (("prefill", pr.prefill), ("decode step", pr.decode)):
        out.append(f"  {name:16s} {c.compute:10.3f} {c.disk:9.3f} {c.h2d:10.3f} {c.d2h:10.3f} {c.total:9.3f}")
    out.append(f"bottleneck: {pr.bottleneck} (decode), {pr.prefill.bottleneck} (prefill)")
    out.append("memory: " + ", ".join(f"{t} {fmt_bytes(n)}" for t, n in pr.memory.items()))
    return out
