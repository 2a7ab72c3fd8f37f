"""CPU throughput on the embedded model: tiergen vs transformers vs llama.cpp.

    python benchmarks/cpu_throughput.py [--prompts 256] [--prompt-len 64] [--gen 64]
                                        [--systems peak,tiergen,transformers,llama.cpp] [--rounds 2]

One run, one process tree: the prompts (``--prompts`` windows of
``--prompt-len`` tokens of CPython's pydoc topics, see ``real_prompts.py``) are
tokenized once and every system gets the same token ids; each system (and the
matmul-peak probe) runs in a subprocess of its own, one after another, so no
two share a thread pool or a core. With ``--rounds`` (default 2) tiergen and
transformers then run again, alternating, so a drift of the host reaches both:
each system's fastest round is reported, and every round's ratio beside it
(transformers' later rounds reuse the batch size its first sweep chose).
Generation is greedy with EOS ignored,
``--gen`` new tokens per prompt; throughput = generated tokens / wall time of
the whole generate (prefill included), in steady state: tiergen and transformers
each run the whole workload after a warm-up of it and report their fastest run
at the chosen configuration (tiergen's first, cold call is printed beside; see
``cpu_systems.py``).

Baselines get their best settings: transformers runs at the faster of bf16 and
float32 as the peak probe measured them on this machine (``--hf-dtype auto``; bf16
where the CPU has native bf16 arithmetic, float32 where it has only AVX2) and
sweeps its batch size (``--hf-batches``), llama.cpp
(llama-cpp-python, the GGUF's own Q4_1 weights, batched through the C API)
sweeps the number of parallel sequences.

Roofline: 2 x (matmul parameters) x tokens / peak matmul rate of tiergen's
dtype, measured here by ``matmul_peak.py``. Reported three ways: over generated
tokens only (what the issue's figure counts); over all tokens the model must
process (prompt tokens too, without the LM head for all but the last prompt
position) -- the work actually done; and as a full roofline, where each decode
pass also cannot beat reading its weights and its K/V cache at the read rate
``memory_peak.py`` measures in the same run.

Writes benchmarks/results/cpu_throughput.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SYSTEMS = ("peak", "tiergen", "transformers", "llama.cpp")


# ---------------------------------------------------------------- workers
def worker(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from benchmarks import cpu_systems as cs
    prompts, gen, gguf = spec["prompts"], spec["gen"], spec["gguf"]
    if name == "peak":
        import torch
        from benchmarks.matmul_peak import model_shapes, peak_rates
        c = spec["config"]
        shapes = model_shapes(c["hidden"], c["ffn"], c["q_dim"], c["kv_dim"], c["vocab"],
                              rows=(len(prompts), len(prompts) * 4))
        from benchmarks.memory_peak import read_rate
        return {"system": "peak", "rates": peak_rates(shapes, (torch.float32, torch.bfloat16)),
                "memory": read_rate()}
    if name == "tiergen":
        return cs.run_tiergen(prompts, gen, spec["model"], dtype=spec.get("tiergen_dtype"),
                              batch_size=spec.get("tiergen_batch"))
    if name == "transformers":
        return cs.run_transformers(prompts, gen, gguf, dtype=spec["hf_dtype"],
                                   batch_sizes=tuple(spec["hf_batches"]))
    if name == "llama.cpp":
        return cs.run_llama_cpp(prompts, gen, gguf)
    raise ValueError(name)


def run_worker(name: str, spec_path: str, log_dir: str) -> dict[str, Any]:
    """Runs one system in a fresh interpreter; its chatter goes to a log file."""
    out = os.path.join(log_dir, f"{name}.json")
    log = os.path.join(log_dir, f"{name}.log")
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name, "--spec", spec_path,
                             "--result", out], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-3000:]
        return {"system": name, "error": f"exit {rc}", "log_tail": tail}
    with open(out) as f:
        return json.load(f)


def fastest_dtype(peak: dict[str, Any]) -> str:
    """The dtype (bfloat16 or float32) whose measured matmul peak is higher; bfloat16 unmeasured."""
    rates = {dt: r["peak_gflops"] for dt, r in peak.get("rates", {}).items() if dt in ("bfloat16", "float32")}
    return max(rates, key=rates.get) if rates else "bfloat16"


# ---------------------------------------------------------------- rounds
def generated(r: dict[str, Any]) -> int:
    return sum(map(len, r["tokens"]))


def best_of_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each system's fastest run over the rounds (a failed round counts only if all failed)."""
    best: dict[str, Any] = {}
    for rd in rounds:
        for name, r in rd.items():
            cur = best.get(name)
            if cur is None or ("error" in cur and "error" not in r) or (
                    "error" not in r and "error" not in cur and r["wall_s"] < cur["wall_s"]):
                best[name] = r
    return best


def round_ratios(rounds: list[dict[str, Any]]) -> list[float | None]:
    """tiergen / transformers throughput in each round, from runs made side by side."""
    out: list[float | None] = []
    for rd in rounds:
        tg, hf = rd.get("tiergen", {}), rd.get("transformers", {})
        ok = "wall_s" in tg and "wall_s" in hf and "error" not in tg and "error" not in hf
        out.append(generated(tg) / tg["wall_s"] / (generated(hf) / hf["wall_s"]) if ok else None)
    return out


# ---------------------------------------------------------------- report
def matmul_params(cfg: Any) -> tuple[int, int]:
    """(parameters in the layers' matmuls, parameters of the LM head)."""
    h, f = cfg.hidden_size, cfg.ffn_dim
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (2 * h * q + 2 * h * kv + 3 * h * f), cfg.vocab_size * h


def torch_itemsize(dtype: str) -> int:
    import torch
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def roofline_seconds(cfg: Any, n: int, plen: int, gen: int, flop_s: float, byte_s: float, elem: int) -> float:
    """The least time the whole run can take on this machine: the prefill's arithmetic, then
    each decode pass bound by the larger of its arithmetic and its memory reads (every
    weight it multiplies, once, and the K/V cache it attends over, at ``elem`` bytes)."""
    layers, head = matmul_params(cfg)
    kv_col = 2 * cfg.num_kv_heads * cfg.head_dim * elem * cfg.num_layers * n   # one cache column, all layers
    t = 2 * (layers * n * plen + head * n) / flop_s
    for s in range(1, gen):
        flops = 2 * (layers + head) * n
        reads = (layers + head) * elem + kv_col * (plen + s)
        t += max(flops / flop_s, reads / byte_s)
    return t


def agreement(a: list[list[int]], b: list[list[int]], first: int = 16) -> float:
    """Share of prompts whose first ``first`` generated tokens are identical."""
    return sum(x[:first] == y[:first] for x, y in zip(a, b)) / max(1, len(a))


def report(res: dict[str, Any], cfg: Any, n: int, plen: int, gen: int) -> dict[str, Any]:
    layers, head = matmul_params(cfg)
    systems = res["systems"]
    summary: dict[str, Any] = {}
    for name, r in systems.items():
        if name == "peak" or "error" in r:
            continue
        toks = generated(r)
        summary[name] = {"tok_s": toks / r["wall_s"], "wall_s": r["wall_s"], "generated": toks,
                         "other_cpu_s": r["other_cpu_s"], "cores_used": r["cores_used"]}
    tg = summary.get("tiergen")
    if tg:
        for other in ("transformers", "llama.cpp"):
            if other in summary:
                tg[f"x_{other}"] = tg["tok_s"] / summary[other]["tok_s"]
                tg[f"agree16_{other}"] = agreement(systems["tiergen"]["tokens"], systems[other]["tokens"])
        peak = systems.get("peak", {}).get("rates", {}).get(systems["tiergen"]["dtype"])
        if peak:
            rate = peak["peak_gflops"] * 1e9
            gen_flops = 2 * (layers + head) * tg["generated"]
            # prompt tokens: every layer, the head only at the last position; the first
            # generated token comes out of the prefill, so decode passes are gen - 1
            work = 2 * (layers * n * plen + head * n) + 2 * (layers + head) * n * (gen - 1)
            tg["peak_gflops"] = peak["peak_gflops"]
            tg["roofline_generated_tok_s"] = rate / (2 * (layers + head))
            tg["roofline_fraction_generated"] = gen_flops / rate / tg["wall_s"]
            tg["roofline_fraction_all_work"] = work / rate / tg["wall_s"]
            tg["achieved_gflops"] = work / tg["wall_s"] / 1e9
        memory = systems.get("peak", {}).get("memory")
        if peak and memory:
            elem = torch_itemsize(systems["tiergen"]["dtype"])
            t = roofline_seconds(cfg, n, plen, gen, peak["peak_gflops"] * 1e9, memory["peak_gb_s"] * 1e9, elem)
            tg["memory_gb_s"] = memory["peak_gb_s"]
            tg["roofline_compute_memory_s"] = t
            tg["roofline_compute_memory_tok_s"] = tg["generated"] / t
            tg["roofline_fraction_compute_memory"] = t / tg["wall_s"]
    return summary


def print_summary(summary: dict[str, Any], res: dict[str, Any]) -> None:
    sys_ = res["systems"]
    print(f"\n{res['prompts']} prompts x {res['prompt_len']} tokens, {res['gen']} new tokens each, greedy "
          f"({res['machine']})")
    for name, s in summary.items():
        r = sys_[name]
        if name == "tiergen":
            how = (f"{r['dtype']}, batch {r['batch_size']} x {r['num_micro_batches']}, "
                   f"runs {r['cold_wall_s']:.1f} (cold, the warm-up), "
                   f"{', '.join(f'{t:.1f}' for t in r['timed_wall_s'])} s")
        elif name == "transformers":
            how = (f"{r['dtype']}, batch {r['batch_size']}, runs {r['sweep_wall_s']:.1f} (in the sweep), "
                   f"{', '.join(f'{t:.1f}' for t in r['timed_wall_s'])} s (sweep {r['sweep_tok_s']})")
        else:
            how = f"{r['weights']}, {r['n_seq']} parallel sequences (sweep {r['sweep_tok_s']})"
        print(f"  {name:13s} {s['tok_s']:8.1f} tok/s  {s['wall_s']:7.1f} s  [{how}]  "
              f"other load {s['other_cpu_s']:.1f} cpu-s")
    tg = summary.get("tiergen", {})
    for other in ("transformers", "llama.cpp"):
        if f"x_{other}" in tg:
            print(f"  tiergen / {other}: {tg[f'x_{other}']:.2f}x  "
                  f"(same first 16 tokens on {100 * tg[f'agree16_{other}']:.0f}% of prompts)")
    if "roofline_fraction_generated" in tg:
        print(f"  roofline ({tg['peak_gflops']:.0f} GFLOP/s peak {sys_['tiergen']['dtype']}): "
              f"{tg['roofline_generated_tok_s']:.0f} generated tok/s -> tiergen at "
              f"{100 * tg['roofline_fraction_generated']:.0f}% counting generated tokens, "
              f"{100 * tg['roofline_fraction_all_work']:.0f}% counting all work "
              f"({tg['achieved_gflops']:.0f} GFLOP/s)")
    if "roofline_fraction_compute_memory" in tg:
        print(f"  roofline with memory reads ({tg['memory_gb_s']:.1f} GB/s): "
              f"{tg['roofline_compute_memory_tok_s']:.0f} generated tok/s for the whole run -> tiergen at "
              f"{100 * tg['roofline_fraction_compute_memory']:.0f}%")
    ratios = [f"{x:.2f}x" if x else "-" for x in res.get("round_ratios", [])]
    if len(ratios) > 1:
        print(f"  tiergen / transformers round by round: {', '.join(ratios)}")
    for name, r in sys_.items():
        if "error" in r:
            print(f"  {name}: FAILED ({r['error']})\n{r['log_tail']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--tiergen-dtype", default=None, help="default: tiergen's own default")
    ap.add_argument("--tiergen-batch", type=int, default=None, help="default: tiergen's own default")
    ap.add_argument("--hf-dtype", default="auto",
                    help="auto: the faster of bfloat16 and float32 by the peak probe (bfloat16 without it)")
    ap.add_argument("--hf-batches", default="16,32,64,128,256", help="transformers' batch sizes to sweep")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of tiergen and transformers, alternating (each system's best round "
                         "is reported, and every round's ratio)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_throughput.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        with open(a.spec) as f:
            spec = json.load(f)
        r = worker(a.worker, spec)
        with open(a.result, "w") as f:
            json.dump(r, f)
        return

    from benchmarks.real_prompts import token_windows
    from tiergen.weights.source import resolve
    source = resolve(a.model)
    cfg = source.config
    gguf = source.description[len("GGUF "):] if source.description.startswith("GGUF ") else None
    prompts = token_windows(source.tokenizer(), a.prompts, a.prompt_len)
    spec = {"prompts": prompts, "gen": a.gen, "model": a.model, "gguf": gguf, "hf_dtype": a.hf_dtype,
            "hf_batches": [int(b) for b in a.hf_batches.split(",")],
            "tiergen_dtype": a.tiergen_dtype, "tiergen_batch": a.tiergen_batch,
            "config": {"hidden": cfg.hidden_size, "ffn": cfg.ffn_dim, "q_dim": cfg.num_heads * cfg.head_dim,
                       "kv_dim": cfg.num_kv_heads * cfg.head_dim, "vocab": cfg.vocab_size}}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    res: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "commit": commit, "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": a.model, "prompts": a.prompts, "prompt_len": a.prompt_len, "gen": a.gen,
        "prompt_source": "pydoc_data/topics.py token windows", "systems": {}}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        names = a.systems.split(",")
        for name in names:
            if name not in SYSTEMS:
                raise SystemExit(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
            if name != "peak" and name != "tiergen" and gguf is None:
                raise SystemExit(f"{name} needs a GGUF model")
        rounds: list[dict[str, Any]] = []
        for i in range(a.rounds):
            # later rounds repeat only the pair whose ratio the drift of a VM would skew most,
            # transformers at the batch size its first sweep chose
            again = [n for n in names if n in ("tiergen", "transformers")] if i else names
            done: dict[str, Any] = {}
            for name in again:
                if name == "transformers" and spec["hf_dtype"] == "auto":
                    spec["hf_dtype"] = fastest_dtype(res["systems"].get("peak", {}))
                first = rounds[0].get(name) if i else None
                if name == "transformers" and first is not None and "error" not in first:
                    spec["hf_batches"] = [first["batch_size"]]
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                print(f"running {name} (round {i + 1} of {a.rounds}) ...", flush=True)
                done[name] = run_worker(name, spec_path, tmp)
                res["systems"].setdefault(name, done[name])   # the peak's rates pick transformers' dtype
            rounds.append(done)
        res["systems"].update(best_of_rounds(rounds))
        res["rounds"] = [{n: {k: v for k, v in r.items() if k != "tokens"} for n, r in rd.items()}
                         for rd in rounds]
    res["summary"] = report(res, cfg, a.prompts, a.prompt_len, a.gen)
    res["round_ratios"] = round_ratios(rounds)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print_summary(res["summary"], res)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
