"""The cost model's predicted throughput against measured `tiergen bench` runs.

Every run is a fresh `tiergen bench --json` process; "capped" runs go through
benchmarks/cgroup.py (RAM + page cache + swap capped, page cache dropped, the
model's files evicted), so disk offload really reads the disk. The prediction
uses the profile given (default: this machine's cached one) and the budgets
the run used, for the same workload. A spec "auto" runs `--policy auto` (the
search, inside the run, under that run's own budgets).

    python benchmarks/predict_vs_measure.py --out results.json \\
        --ram "16x1@100,0,100,0,100,0" auto --capped "32x1@0,30,0,100,0,100" auto

Spec format (as offload_benchmark.py): BxK@w_gpu,w_cpu,c_gpu,c_cpu,a_gpu,a_cpu[+flag...].
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks.offload_benchmark import capped_entry, last_json, parse_tiergen_spec, private_copy  # noqa: E402

OPT_DIR = "/tmp/tiergen-bench/opt-1.3b-random"


def bench_cmd(model: str, spec: str, prompt_len: int, gen_len: int, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "tiergen.cli", "bench", "--model", model, "--prompt-len", str(prompt_len),
           "--gen-len", str(gen_len), "--json", *extra]
    if spec.startswith("auto"):
        return cmd + ["--policy", "auto", *[f for f in spec.split("+")[1:]]]
    b, k, pct, flags = parse_tiergen_spec(spec, [100, 0, 100, 0, 100, 0])
    return cmd + ["--gpu-batch-size", str(b), "--num-gpu-batches", str(k), "--percent", *map(str, pct), *flags]


def run(cmd: list[str], cap: int | None, evict: list[str], timeout: float) -> tuple[dict | None, str, dict | None]:
    """(bench JSON, stderr tail, the cgroup's account of a capped run: peaks, major faults, disk reads)."""
    if cap:
        from benchmarks.cgroup import run_capped
        r = run_capped(cmd, cap, timeout, evict=evict, cwd=str(ROOT))
        return last_json(r.stdout), r.stderr[-800:], capped_entry(r)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    return last_json(p.stdout), p.stderr[-800:], None


def predict_for(result: dict[str, Any], model: str, profile: Any) -> dict[str, Any]:
    """The cost model's prediction for the policy the run really used, under its budgets."""
    import torch

    from tiergen.policy import Policy
    from tiergen.policy.cost_model import CostModel, Workload
    from tiergen.quant import KVQuantConfig, QuantConfig
    from tiergen.weights.source import resolve
    pd = dict(result["policy"])
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    for key, cls in (("weight_quant", QuantConfig), ("cache_quant", KVQuantConfig)):
        if key not in pd:           # results written before the quantizer existed
            continue
        q = dict(pd[key])
        if q.get("scale_dtype"):
            q["scale_dtype"] = dt[q["scale_dtype"]]
        pd[key] = cls(**q)
    policy = Policy(**pd)
    cfg = resolve(model, dummy=True).config
    cm = CostModel(cfg, dt[result["dtype"]], profile, Workload(result["prompt_len"], result["gen_len"]),
                   dt[result.get("offload_dtype", result["dtype"])])
    return cm.predict(policy).to_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=None, help="profile JSON (default: this machine's cached profile)")
    ap.add_argument("--ram-model", default="smollm2-135m")
    ap.add_argument("--ram", nargs="*", default=[], help="specs run in RAM (no cap)")
    ap.add_argument("--ram-prompt-len", type=int, default=64)
    ap.add_argument("--ram-gen-len", type=int, default=16)
    ap.add_argument("--capped-model", default=OPT_DIR)
    ap.add_argument("--capped", nargs="*", default=[], help="specs run under the memory cap")
    ap.add_argument("--capped-prompt-len", type=int, default=32)
    ap.add_argument("--capped-gen-len", type=int, default=8)
    ap.add_argument("--mem-cap", default="2GiB")
    ap.add_argument("--capped-cpu-mem", default="0.9GiB", help="tiergen --cpu-mem under the cap")
    ap.add_argument("--capped-gpu-mem", default="0.5GiB", help="tiergen --gpu-mem under the cap (the same RAM)")
    ap.add_argument("--offload-dir", default="/tmp/tiergen-bench/offload")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--reuse", nargs="*", default=[],
                    help="earlier --out files (FILE or FILE:ram / FILE:capped for one kind of row): their "
                         "measured rows join this table, re-predicted with this profile and cost model "
                         "(nothing is re-run)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from benchmarks.cgroup import parse_bytes
    from tiergen.policy.profile import cached_profile, load_profile
    profile = load_profile(a.profile) if a.profile else cached_profile()
    rows: list[dict[str, Any]] = []
    for spec in a.reuse:
        path, _, only = spec.partition(":")
        for old in json.loads(Path(path).read_text())["rows"]:
            if old["status"] != "ok" or (only and old["kind"] != only):
                continue
            res = old["measured"]
            pred = predict_for(res, a.capped_model if old["kind"] == "capped" else old["model"], profile)
            row = {k: v for k, v in old.items() if k not in ("predicted", "predicted_tok_s", "error")}
            row |= {"reused_from": path, "predicted": pred, "predicted_tok_s": pred["throughput"],
                    "error": pred["throughput"] / res["total_tok_s"] - 1}
            print(f"[{old['kind']} {old['spec']}] (reused) measured {res['total_tok_s']:.2f} predicted "
                  f"{pred['throughput']:.2f} tok/s ({row['error']:+.0%})", file=sys.stderr)
            rows.append(row)
    groups = [("ram", a.ram_model, a.ram, a.ram_prompt_len, a.ram_gen_len, None, [])]
    copy_dir = None
    if not (a.ram or a.capped):
        groups = []
    if a.capped:
        Path(a.offload_dir, "tiergen").mkdir(parents=True, exist_ok=True)
        copy_dir = Path(a.offload_dir) / f"model-copy-{int(time.time())}"
        model = private_copy(a.capped_model, copy_dir)
        # Under a shared-RAM cap both tiers come out of it: budgets the cap can hold.
        extra = ["--cpu-mem", a.capped_cpu_mem, "--gpu-mem", a.capped_gpu_mem,
                 "--offload-dir", str(Path(a.offload_dir) / "tiergen")]
        groups.append(("capped", model, a.capped, a.capped_prompt_len, a.capped_gen_len,
                       parse_bytes(a.mem_cap), extra))
    try:
        for kind, model, specs, P, G, cap, extra in groups:
            ram_extra = extra if cap else ["--offload-dir", str(Path(a.offload_dir) / "tiergen")]
            for spec in specs:
                cmd = bench_cmd(model, spec, P, G, ram_extra)
                t0 = time.perf_counter()
                res, err, capped = run(cmd, cap, [model, a.offload_dir] if cap else [], a.timeout)
                wall = time.perf_counter() - t0
                row: dict[str, Any] = {"kind": kind, "model": Path(model).name if cap else model, "spec": spec,
                                       "command": cmd, "wall_s": wall, "capped": capped}
                if res is None:
                    row["status"] = "failed"
                    row["stderr"] = err
                    print(f"[{kind} {spec}] failed: {err[-300:]}", file=sys.stderr)
                else:
                    pred = predict_for(res, model, profile)
                    row |= {"status": "ok", "measured": res, "predicted": pred,
                            "measured_tok_s": res["total_tok_s"], "predicted_tok_s": pred["throughput"],
                            "error": pred["throughput"] / res["total_tok_s"] - 1}
                    print(f"[{kind} {spec}] measured {res['total_tok_s']:.2f} predicted "
                          f"{pred['throughput']:.2f} tok/s ({row['error']:+.0%})", file=sys.stderr)
                rows.append(row)
    finally:
        if copy_dir is not None:
            import shutil
            shutil.rmtree(copy_dir, ignore_errors=True)
    ok = [r for r in rows if r["status"] == "ok"]
    errs = [abs(r["error"]) for r in ok]
    summary = {"median_abs_error": statistics.median(errs) if errs else None,
               "max_ratio": max(max(r["predicted_tok_s"] / r["measured_tok_s"],
                                    r["measured_tok_s"] / r["predicted_tok_s"]) for r in ok) if ok else None}
    for kind in ("ram", "capped"):
        hand = [r for r in ok if r["kind"] == kind and not r["spec"].startswith("auto")]
        auto = [r for r in ok if r["kind"] == kind and r["spec"].startswith("auto")]
        if hand and auto:
            summary[f"{kind}_auto_vs_best_hand"] = (max(r["measured_tok_s"] for r in auto)
                                                    / max(r["measured_tok_s"] for r in hand))
    print(report(ok, summary))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "profile": profile.to_dict(), "rows": rows,
                                           "summary": summary}, indent=1, default=str))
    return 0 if ok else 1


def report(ok: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    out = ["| run | model | policy (BxK, percent, flags) | measured tok/s | predicted tok/s | error | "
           "predicted bottleneck |", "|---|---|---|---|---|---|---|"]
    for r in ok:
        p = r["measured"]["policy"]
        pct = " ".join(f"{p[k]:g}" for k in ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent",
                                              "cache_cpu_percent", "act_gpu_percent", "act_cpu_percent"))
        flags = [f for f in ("cpu_attention", "compress_weight", "compress_cache") if p.get(f)]
        if p["schedule"] != "zigzag":
            flags.append(p["schedule"])
        if not p["overlap"]:
            flags.append("no-overlap")
        name = f"{r['kind']}{' (auto)' if r['spec'].startswith('auto') else ''}"
        out.append(f"| {name} | {r['model']} | {p['gpu_batch_size']}x{p['num_gpu_batches']}, {pct}"
                   f"{', ' + ', '.join(flags) if flags else ''} | {r['measured_tok_s']:.2f} | "
                   f"{r['predicted_tok_s']:.2f} | {r['error']:+.0%} | {r['predicted']['bottleneck']} |")
    out.append("")
    out.append("summary: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
