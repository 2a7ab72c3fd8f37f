"""tiergen vs Hugging Face Accelerate disk offload under one memory cap, in one run.

Every run (the roofline probe, each Accelerate batch size, each tiergen
policy) is a fresh process in its own cgroup v1 memory cgroup capped at
``--mem-cap`` (RAM + page cache + swap), after the page cache is dropped, so
a model larger than the cap has to come from the disk again and again.

    python benchmarks/offload_benchmark.py --out /tmp/tiergen-bench/results.json
    python benchmarks/offload_benchmark.py --quick        # tiny model, smoke test

Prints a markdown table (prefill / decode / total tok/s, peak memory), the
ratio of the best tiergen to the best Accelerate generation throughput, and
the roofline per decode step: max(disk bytes / disk bandwidth, FLOPs / matmul
rate) with the bandwidth and matmul rates measured under the same cap.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks import roofline as rl  # noqa: E402
from benchmarks.cgroup import (available, evict_files, fmt_bytes,  # noqa: E402
                               machine_busy_s, mappers, parse_bytes, run_capped)

DEFAULT_MODEL = "/tmp/tiergen-bench/opt-1.3b-random"
TINY_MODEL = "/tmp/tiergen-bench/opt-tiny-random"


# ---------------------------------------------------------------- helpers

def last_json(text: str) -> dict[str, Any] | None:
    """The last stdout line that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def tail(text: str, n: int = 1500) -> str:
    return text[-n:] if len(text) > n else text


def parse_tiergen_batch(spec: str) -> tuple[int, int]:
    """'16x2' -> (gpu_batch_size 16, num_gpu_batches 2); '8' -> (8, 1). See parse_tiergen_spec."""
    b, _, k = spec.split("@")[0].split("+")[0].lower().partition("x")
    return int(b), int(k or 1)


def parse_tiergen_spec(spec: str, default_percent: list) -> tuple[int, int, list, list[str]]:
    """'BxK[@p1,...,p6][+flag[+flag]]', e.g. '32x4@0,35,0,50,0,100+--schedule=row+--no-overlap':
    block shape, the six percents (default --tiergen-percent) and extra bench flags."""
    head, *flags = spec.split("+")
    shape, _, pct = head.partition("@")
    b, k = parse_tiergen_batch(shape)
    percent = [float(x) for x in pct.split(",")] if pct else list(default_percent)
    percent = [int(p) if float(p).is_integer() else p for p in percent]
    return b, k, percent, flags


def tiergen_cmd() -> list[str]:
    exe = shutil.which("tiergen")
    return [exe] if exe else [sys.executable, "-m", "tiergen.cli"]


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    vers: dict[str, str] = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version
    for pkg in ("torch", "transformers", "accelerate", "safetensors", "tiergen"):
        try:
            vers[pkg] = version(pkg)
        except PackageNotFoundError:
            vers[pkg] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "kernel": platform.release(),
            "versions": vers}


def capped_entry(r: Any) -> dict[str, Any]:
    s = r.summary()
    ev = s.pop("evicted", None) or {}
    # share of the evicted files still cached when the run began (0 = all cold)
    s["resident_after_evict"] = max(ev.values()) if ev else None
    return s


def cache_leak_check(a: argparse.Namespace) -> dict[str, Any]:
    """Who else holds the model files (their cached pages are not charged to
    our cgroup, so a capped run would read them for free)."""
    hold = mappers([a.model_dir])
    return {"other_processes": {str(k): v for k, v in hold.items()}}


def wait_quiet(a: argparse.Namespace) -> dict[str, float]:
    """Wait (at most --quiet-wait s) until the rest of the machine uses less
    than --quiet-cores cores, so other people's jobs do not eat into a run."""
    t0 = time.perf_counter()
    level = -1.0
    while True:
        b0 = machine_busy_s()
        time.sleep(1.0)
        level = machine_busy_s() - b0  # cores busy over that second (we only slept)
        waited = time.perf_counter() - t0
        if level <= a.quiet_cores or waited >= a.quiet_wait:
            return {"waited_s": round(waited, 1), "others_cores": round(level, 2)}


def private_copy(src: str, dst: Path) -> str:
    """Copy a model dir (a new inode per file, so a page cache of its own);
    other processes reading the original cannot share pages with our runs."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(Path(src).iterdir()):
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    evict_files([dst])  # flush and drop what the copy left in the cache
    return str(dst)


# ---------------------------------------------------------------- the runs

def run_probe(a: argparse.Namespace, rows: list[int]) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "roofline.py"), "--probe", "--model-dir", a.model_dir,
           "--batches", *map(str, rows), "--prompt-len", str(a.prompt_len),
           "--disk-bytes", str(a.probe_disk_bytes), "--dtypes", "bfloat16", "float32"]
    quiet = wait_quiet(a)
    r = run_capped(cmd, a.mem_cap, a.timeout, evict=[a.model_dir], cwd=str(ROOT))
    res = last_json(r.stdout)
    print(f"[probe] {r.wall_s:.0f} s, rc {r.returncode}", file=sys.stderr)
    return {"command": cmd, "quiet": quiet, "capped": capped_entry(r), "result": res,
            "stderr_tail": None if res else tail(r.stderr)}


def run_accelerate(a: argparse.Namespace, batch: int, dtype: str = "bfloat16") -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "run_accelerate.py"), "--model-dir", a.model_dir,
           "--batch", str(batch), "--prompt-len", str(a.prompt_len), "--gen-len", str(a.gen_len),
           "--cpu-mem", str(a.acc_cpu_mem), "--offload-dir", str(Path(a.offload_dir) / "accelerate"),
           "--dtype", dtype]
    quiet = wait_quiet(a)
    r = run_capped(cmd, a.mem_cap, a.timeout, evict=[a.model_dir, a.offload_dir], cwd=str(ROOT))
    res = last_json(r.stdout)
    status = "ok" if (r.returncode == 0 and res) else (
        "oom" if r.oom_killed else "timeout" if r.timed_out else "failed")
    print(f"[accelerate b={batch} {dtype}] {status}, {r.wall_s:.0f} s", file=sys.stderr)
    return {"system": "accelerate", "batch": batch,
            "policy": f"{dtype}, max_memory cpu={a.acc_cpu_mem}, rest disk",
            "status": status, "command": cmd, "quiet": quiet, "capped": capped_entry(r), "result": res,
            "stderr_tail": None if status == "ok" else tail(r.stderr)}


def run_tiergen(a: argparse.Namespace, spec: str) -> dict[str, Any]:
    b, k, percent, flags = parse_tiergen_spec(spec, a.tiergen_percent)
    cmd = [*tiergen_cmd(), "bench", "--model", a.model_dir, "--prompt-len", str(a.prompt_len),
           "--gen-len", str(a.gen_len), "--gpu-batch-size", str(b), "--num-gpu-batches", str(k),
           "--percent", *map(str, percent), "--cpu-mem", str(a.tiergen_cpu_mem),
           "--offload-dir", str(Path(a.offload_dir) / "tiergen"), "--json", *a.tiergen_extra.split(), *flags]
    (Path(a.offload_dir) / "tiergen").mkdir(parents=True, exist_ok=True)
    quiet = wait_quiet(a)
    r = run_capped(cmd, a.mem_cap, a.timeout, evict=[a.model_dir, a.offload_dir], cwd=str(ROOT))
    res = last_json(r.stdout)
    err = r.stderr
    if r.returncode == 0 and res:
        status = "ok"
    elif ("invalid choice" in err and "bench" in err) or "No module named tiergen" in err:
        status = "not available"  # the bench subcommand is not there (yet)
    elif r.oom_killed:
        status = "oom"
    elif r.timed_out:
        status = "timeout"
    else:
        status = "failed"
    print(f"[tiergen {b}x{k}] {status}, {r.wall_s:.0f} s", file=sys.stderr)
    pct = " ".join(map(str, percent))
    extra = " ".join([*a.tiergen_extra.split(), *flags])
    return {"system": "tiergen", "batch": b * k, "gpu_batch_size": b, "num_gpu_batches": k,
            "policy": f"{b}x{k}, percent {pct}{' ' + extra if extra else ''}",
            "status": status, "command": cmd, "quiet": quiet, "capped": capped_entry(r), "result": res,
            "stderr_tail": None if status == "ok" else tail(err)}


# ---------------------------------------------------------------- roofline

def rate_at(table: dict[str, Any], rows: int) -> float:
    """Measured GFLOP/s at ``rows``, or the nearest measured row count."""
    if str(rows) in table:
        return table[str(rows)]["GFLOPs"]
    near = min(table, key=lambda r: abs(int(r) - rows))
    return table[near]["GFLOPs"]


def weight_bytes(model_dir: str) -> int:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return rl.Shape.from_config(cfg).weight_bytes(2, cfg.get("max_position_embeddings", 2048))


def build_roofline(a: argparse.Namespace, probe: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    cfg = json.loads((Path(a.model_dir) / "config.json").read_text())
    shape = rl.Shape.from_config(cfg)
    W = shape.weight_bytes(2, cfg.get("max_position_embeddings", 2048))
    bw = probe["disk_GBps"] * 1e9
    dec, pre = probe["matmul_decode"], probe["matmul_prefill"]

    def rates(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The matmul tables at the dtype that run computed in."""
        sfx = "" if run["result"].get("dtype", "bfloat16") == "bfloat16" else f"_{run['result']['dtype']}"
        return probe.get(f"matmul_decode{sfx}", dec), probe.get(f"matmul_prefill{sfx}", pre)
    runtime = probe.get("process_rss_bytes", 0)
    P, G = a.prompt_len, a.gen_len
    ctx = P + G // 2
    rows: list[dict[str, Any]] = []
    batches = sorted({r["batch"] for r in runs} | set(a.acc_batches))
    for B in batches:
        kv = shape.kv_bytes(B, P + G)
        # best placement the cap allows: keep what the runtime, the KV cache and
        # a double buffer for streamed layers leave of the cap
        keep = max(0, a.mem_cap - runtime - kv - 2 * shape.layer_weight_bytes())  # + 2 layer buffers
        for label, disk in (("min disk traffic under the cap", max(0.0, W - keep)),
                            ("all weights streamed from disk", float(W))):
            d = rl.decode_roofline(shape, B, ctx, disk, bw, rate_at(dec, B))
            t = rl.total_roofline(shape, B, P, G, disk, bw, rate_at(dec, B), rate_at(pre, B))
            rows.append({"batch": B, "case": label, "kv_bytes": kv, **d,
                         "gflops_decode": rate_at(dec, B), "total_tok_s": t["total_tok_s"],
                         "total": t})
    # per measured run: the roofline of the placement that system actually used
    for r in runs:
        if r["status"] != "ok":
            continue
        B = r["batch"]
        mb = r.get("gpu_batch_size", B)
        if r["system"] == "accelerate":
            disk = float(r["result"]["device_map_summary"]["bytes_per_device"].get("disk", 0))
        else:
            # what the run really read from disk per forward pass (streamed weights, embedding
            # rows, KV-cache prefixes): prefill plus gen_len - 1 decode steps = gen_len passes
            links = r["result"].get("links", {})
            disk = float(links.get("disk->gpu", 0) + links.get("disk->cpu", 0)) / max(1, G)
        rdec, rpre = rates(r)
        d = rl.decode_roofline(shape, B, ctx, disk, bw, rate_at(rdec, mb))
        t = rl.total_roofline(shape, B, P, G, disk, bw, rate_at(rdec, mb), rate_at(rpre, mb))
        r["roofline"] = {"disk_bytes": disk, "gflops_decode": rate_at(rdec, mb),
                         "decode_tok_s": d["decode_tok_s"], "step_s": d["step_s"],
                         "bound": d["bound"], "total_tok_s": t["total_tok_s"],
                         "decode_efficiency": r["result"]["decode_tok_s"] / d["decode_tok_s"]}
    return {"weight_bytes": W, "disk_GBps": probe["disk_GBps"], "runtime_rss_bytes": runtime,
            "decode_ctx": ctx, "rows": rows}


# ---------------------------------------------------------------- report

def fnum(x: float | None, nd: int = 2) -> str:
    if x is None:
        return "–"
    return f"{x:.{nd}f}" if x < 100 else f"{x:.0f}"


def report(data: dict[str, Any]) -> str:
    a = data["args"]
    out: list[str] = []
    out.append(f"Model {data['model_source_dir']} ({fmt_bytes(data['weight_bytes'])} "
               f"bf16 weights), cap {fmt_bytes(a['mem_cap'])} (RAM + page cache + swap), "
               f"prompt {a['prompt_len']}, gen {a['gen_len']}; page cache dropped before each run: "
               f"{data['drop_caches_permitted']}\n")
    out.append("| system | batch | policy | prefill tok/s | decode tok/s | total tok/s | "
               "peak cgroup (anon) | disk read | roofline decode tok/s | wall s | status |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        res = r.get("result") or {}
        c = r["capped"]
        ok = r["status"] == "ok"
        peak = f"{fmt_bytes(c['peak_bytes'])} ({fmt_bytes(c['peak_anon_bytes'])})"
        roof = fnum(r["roofline"]["decode_tok_s"]) if "roofline" in r else "–"
        out.append(f"| {r['system']} | {r['batch']} | {r['policy']} | "
                   f"{fnum(res.get('prefill_tok_s')) if ok else '–'} | "
                   f"{fnum(res.get('decode_tok_s')) if ok else '–'} | "
                   f"{fnum(res.get('total_tok_s')) if ok else '–'} | {peak} | "
                   f"{fmt_bytes(c['disk_read_bytes']) if c['disk_read_bytes'] >= 0 else '?'} | {roof} | "
                   f"{c['wall_s']:.0f} | {r['status']} |")
    out.append("")
    out.append("peak cgroup: memory.max_usage_in_bytes (RAM + page cache; a run that streams "
               "weights through the page cache fills it to the cap); anon: sampled peak of "
               "anonymous memory; disk read: /proc/diskstats delta over the whole run (load and "
               "warm-up included, machine-wide); roofline: decode tok/s allowed by the disk bytes "
               "that run's placement reads per step.")
    warm = [f"{r['system']} {r['batch']}: {r['capped']['resident_after_evict']:.0%}" for r in data["runs"]
            if (r["capped"].get("resident_after_evict") or 0) > 0.02]
    if warm:
        out.append("WARNING: model pages still cached when these runs began (read outside the cap): "
                   + ", ".join(warm))
    busy = [(r["system"], r["batch"], r["capped"]["cpu_others_s"] / max(r["capped"]["wall_s"], 1e-9))
            for r in data["runs"]]
    noisy = [f"{s} {b}: {c:.2f}" for s, b, c in busy if c > 0.1]
    if noisy:
        out.append("WARNING: other processes used CPU during these runs (average cores): "
                   + ", ".join(noisy) + "; their numbers are low by up to that share.")
    best = data["best"]
    out.append("")
    for s in ("accelerate", "tiergen"):
        b = best.get(s)
        out.append(f"best {s}: " + (f"batch {b['batch']} ({b['policy']}), {b['total_tok_s']:.3f} tok/s"
                                    if b else "none (no successful run)"))
    ratio = data.get("ratio_total_tok_s")
    out.append("ratio tiergen-best / accelerate-best (total tok/s): "
               + (f"{ratio:.2f}x" if ratio is not None else "n/a"))
    roof = data.get("roofline")
    if roof:
        p = data["probe"]["result"]
        out.append("")
        out.append("Roofline inputs (measured under the cap): disk O_DIRECT "
                   + ", ".join(f"{d['streams']} stream{'s' if d['streams'] > 1 else ''} "
                               f"{d['GBps']:.2f} GB/s" for d in p["disk_direct"])
                   + f"; buffered read {p['disk_buffered']['GBps']:.2f} GB/s; bf16 matmul at "
                   + ", ".join(f"{k} rows {v['GFLOPs']:.1f}" for k, v in p["matmul_decode"].items())
                   + " GFLOP/s (effective over a whole step: layers + LM head); prefill "
                   + ", ".join(f"{v['rows']} rows {v['GFLOPs']:.1f}" for v in p["matmul_prefill"].values())
                   + " GFLOP/s")
        if "matmul_decode_float32" in p:
            out.append("float32 matmul at "
                       + ", ".join(f"{k} rows {v['GFLOPs']:.1f}" for k, v in p["matmul_decode_float32"].items())
                       + " GFLOP/s; prefill "
                       + ", ".join(f"{v['rows']} rows {v['GFLOPs']:.1f}"
                                   for v in p["matmul_prefill_float32"].values()) + " GFLOP/s")
        out.append("")
        out.append("Per run, step = max(disk bytes that run read per pass / disk bandwidth, step FLOPs / "
                   "matmul rate at its dtype and micro-batch rows):")
        out.append("")
        out.append("| system | batch | measured decode step s | roofline step s | bound | measured / roofline |")
        out.append("|---|---|---|---|---|---|")
        for r in data["runs"]:
            if "roofline" not in r:
                continue
            res, rf = r["result"], r["roofline"]
            meas = r["batch"] / res["decode_tok_s"]
            out.append(f"| {r['system']} | {r['batch']} ({r['policy']}) | {meas:.2f} | {rf['step_s']:.2f} | "
                       f"{rf['bound']} | {meas / rf['step_s']:.2f}x |")
        out.append("")
        out.append(f"Roofline per decode step (context {roof['decode_ctx']}), "
                   f"step = max(disk bytes / {roof['disk_GBps']:.2f} GB/s, FLOPs / matmul rate):")
        out.append("")
        out.append("| batch | weights from disk per step | disk s | GFLOP | GFLOP/s | compute s | "
                   "step s | bound | decode tok/s | total tok/s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for row in roof["rows"]:
            out.append(f"| {row['batch']} | {fmt_bytes(row['disk_bytes'])} ({row['case']}) | "
                       f"{row['io_s']:.2f} | {row['flops'] / 1e9:.1f} | {row['gflops_decode']:.1f} | "
                       f"{row['compute_s']:.2f} | {row['step_s']:.2f} | {row['bound']} | "
                       f"{fnum(row['decode_tok_s'])} | {fnum(row['total_tok_s'])} |")
    return "\n".join(out)


def pick_best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best: dict[str, Any] = {}
    for r in runs:
        if r["status"] != "ok":
            continue
        tps = r["result"]["total_tok_s"]
        cur = best.get(r["system"])
        if cur is None or tps > cur["total_tok_s"]:
            best[r["system"]] = {"batch": r["batch"], "policy": r["policy"], "total_tok_s": tps,
                                 "decode_tok_s": r["result"]["decode_tok_s"],
                                 "prefill_tok_s": r["result"]["prefill_tok_s"]}
    return best


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help=f"HF dir (default {DEFAULT_MODEL}, created if missing)")
    ap.add_argument("--mem-cap", default="2GiB", help="cgroup cap: RAM + page cache + swap (default 2GiB)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=8)
    ap.add_argument("--systems", nargs="+", default=["accelerate", "tiergen"],
                    choices=["accelerate", "tiergen"])
    ap.add_argument("--acc-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--acc-cpu-mem", default="1GiB", help="Accelerate max_memory['cpu']")
    ap.add_argument("--acc-dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"],
                    help="Accelerate's compute (and offload) dtypes to run, each at every batch")
    ap.add_argument("--tiergen-batches", nargs="+", default=["1x1", "8x1", "32x1"],
                    help="gpu_batch_size x num_gpu_batches, e.g. 16x2")
    ap.add_argument("--tiergen-percent", type=float, nargs=6, default=[0, 35, 0, 100, 0, 100],
                    metavar="P", help="w_gpu w_cpu c_gpu c_cpu a_gpu a_cpu (FlexGen's six numbers)")
    ap.add_argument("--tiergen-cpu-mem", default="1GiB", help="tiergen's host RAM tier budget (--cpu-mem)")
    ap.add_argument("--tiergen-extra", default="", help="more tiergen bench flags, e.g. '--compress-weight'")
    ap.add_argument("--offload-dir", default="/tmp/tiergen-bench/offload")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per run")
    ap.add_argument("--probe-disk-bytes", type=float, default=4e9)
    ap.add_argument("--no-probe", action="store_true", help="skip the roofline measurements")
    ap.add_argument("--repeat", type=int, default=1, help="run every configuration this many times "
                    "(all rows are reported; the best is taken)")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="before each run, wait until other processes use fewer cores than this")
    ap.add_argument("--quiet-wait", type=float, default=20, help="but wait at most this long (s); 0: never")
    ap.add_argument("--out", default=None, help="write all raw results as JSON here")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model and sizes (overrides the size options): smoke-test the pipeline")
    ap.add_argument("--no-private-copy", dest="private_copy", action="store_false",
                    help="run on --model-dir itself, not on a private copy (then any other process "
                         "that has the files cached lets the runs read them outside the cap)")
    a = ap.parse_args(argv)
    if a.quick:
        a.model_dir = a.model_dir or TINY_MODEL
        a.prompt_len, a.gen_len = 8, 3
        a.acc_batches, a.tiergen_batches = [1, 4], ["1x1", "2x2"]
        a.acc_cpu_mem = "30MB"        # the tiny model's 4 layers: 3 go to disk
        a.tiergen_cpu_mem = "1GiB"
        a.timeout = min(a.timeout, 180)
        a.probe_disk_bytes = min(a.probe_disk_bytes, 64e6)
    a.model_dir = a.model_dir or DEFAULT_MODEL
    a.mem_cap = parse_bytes(a.mem_cap)
    a.tiergen_percent = [int(p) if float(p).is_integer() else p for p in a.tiergen_percent]
    return a


def ensure_model(a: argparse.Namespace) -> None:
    from benchmarks import make_random_opt as mk
    if (Path(a.model_dir) / "config.json").is_file():
        return
    shape = mk.OPT_TINY if a.quick else mk.OPT_1_3B
    print(f"[model] writing {a.model_dir}", file=sys.stderr)
    mk.make(Path(a.model_dir), shape)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    why = available()
    if why:
        print(f"offload_benchmark: cannot cap memory: {why}", file=sys.stderr)
        return 1
    ensure_model(a)
    Path(a.offload_dir).mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    source_dir, copy_dir = a.model_dir, None
    holders = cache_leak_check(a)
    if holders["other_processes"]:
        print(f"[model] other processes hold {a.model_dir}: {holders['other_processes']}", file=sys.stderr)
    if a.private_copy:
        copy_dir = Path(a.offload_dir) / f"model-copy-{os.getpid()}"
        print(f"[model] private copy in {copy_dir}", file=sys.stderr)
        a.model_dir = private_copy(source_dir, copy_dir)
    try:
        return run_all(a, t_all, source_dir, holders)
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
        a.model_dir = source_dir


def run_all(a: argparse.Namespace, t_all: float, source_dir: str, holders: dict[str, Any]) -> int:

    runs: list[dict[str, Any]] = []
    probe: dict[str, Any] | None = None
    if not a.no_probe:
        rows = sorted(set(a.acc_batches) | {parse_tiergen_batch(s)[0] for s in a.tiergen_batches}
                      | {b * k for b, k in map(parse_tiergen_batch, a.tiergen_batches)})
        probe = run_probe(a, rows)
    tiergen_missing = False
    for rep in range(a.repeat):
        if "accelerate" in a.systems:
            runs += [dict(run_accelerate(a, b, dt), repeat=rep) for dt in a.acc_dtypes for b in a.acc_batches]
        if "tiergen" in a.systems and not tiergen_missing:
            for spec in a.tiergen_batches:
                r = dict(run_tiergen(a, spec), repeat=rep)
                runs.append(r)
                if r["status"] == "not available":
                    tiergen_missing = True  # no such subcommand: no point trying other sizes
                    break

    dropped = all(r["capped"]["caches_dropped"] for r in runs) if runs else None
    best = pick_best(runs)
    ratio = (best["tiergen"]["total_tok_s"] / best["accelerate"]["total_tok_s"]
             if "tiergen" in best and "accelerate" in best else None)
    data: dict[str, Any] = {
        "benchmark": "offload_benchmark", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(a).items()}, "machine": machine_info(),
        "drop_caches_permitted": dropped, "probe": probe, "runs": runs, "best": best,
        "ratio_total_tok_s": ratio, "seconds": round(time.perf_counter() - t_all, 1),
        "weight_bytes": weight_bytes(a.model_dir), "model_source_dir": source_dir,
        "model_holders_at_start": holders, "model_holders_at_end": cache_leak_check(a),
    }
    if probe and probe.get("result"):
        data["roofline"] = build_roofline(a, probe["result"], runs)
    text = report(data)
    data["report_markdown"] = text
    if a.out:  # written first, so a closed stdout cannot lose it
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(data, indent=1, default=str))
        print(f"raw results: {a.out}", file=sys.stderr)
    print(text)
    return 0 if any(r["status"] == "ok" for r in runs) or not runs else 1


if __name__ == "__main__":
    sys.exit(main())
