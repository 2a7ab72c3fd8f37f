"""The ``tiergen`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, TextIO

from .errors import TiergenError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return deco


class OutputError(TiergenError):
    """stdout (or stderr) cannot take the output: a full disk, a closed pipe."""


def emit(text: str, stream: TextIO | None = None) -> None:
    """One piece of the command's output, written through at once so that finished work is
    out before anything later can fail; a full disk or a closed pipe is a one-line error."""
    out = stream or sys.stdout
    try:
        out.write(text + "\n")
        out.flush()
    except OSError as e:
        raise OutputError(f"cannot write the output: {e.strerror or e}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default="smollm2-135m",
                   help="known name, HF model dir, .gguf file or cached Hub id (default: the embedded smollm2-135m)")
    g.add_argument("--dummy", action="store_true", help="random weights of the model's shape")
    g.add_argument("--dtype", default=None,
                   help="compute dtype: float32 | bfloat16 | float16 (default: bfloat16, or float32 on a CPU "
                        "where float32 runs faster: measured once per machine, see tiergen/cpu_dtype.py)")
    g.add_argument("--offload-dtype", default=None,
                   help="dtype of weights homed on the host or disk (default: the checkpoint's, if narrower)")
    g.add_argument("--cache-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype the KV cache is stored at, on every tier (default: the compute dtype)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    pol = p.add_argument_group("policy and budgets")
    pol.add_argument("--gpu-batch-size", "--batch-size", type=int, default=None, dest="gpu_batch_size",
                     help="sequences per micro-batch (default 256 on a CPU, 32 on a GPU)")
    pol.add_argument("--num-gpu-batches", type=int, default=1, help="micro-batches per block")
    pol.add_argument("--percent", type=float, nargs=6, default=[100, 0, 100, 0, 100, 0],
                     metavar=("W_GPU", "W_CPU", "CACHE_GPU", "CACHE_CPU", "ACT_GPU", "ACT_CPU"),
                     help="FlexGen's six shares in percent; disk gets the rest of each")
    pol.add_argument("--cpu-attention", action="store_true", help="decode attention on the CPU beside a host cache")
    pol.add_argument("--schedule", choices=["zigzag", "row"], default="zigzag")
    pol.add_argument("--no-overlap", action="store_true", help="do not prefetch while computing")
    pol.add_argument("--no-pin-weight", action="store_true", help="do not page-lock host weights (CUDA)")
    q = p.add_argument_group("compression (group-wise asymmetric n-bit)")
    q.add_argument("--compress-weight", action="store_true",
                   help="store layer matrices quantized (embeddings, norms and biases stay dense)")
    q.add_argument("--compress-cache", action="store_true", help="store the KV cache quantized, on every tier")
    q.add_argument("--quant-bits", type=int, default=None, help="bits per value, 2-8 (default 4)")
    q.add_argument("--group-size", type=int, default=None,
                   help="values per group (default: 32 along the input dim for weights, 64 for the cache)")
    q.add_argument("--cache-keys", choices=["channel", "token"], default="channel",
                   help="group keys per channel over tokens (KIVI, default) or per token like values")
    pol.add_argument("--gpu-mem", help="compute-device budget, e.g. 16GiB (default: free memory)")
    pol.add_argument("--cpu-mem", help="host RAM budget (default: available RAM)")
    pol.add_argument("--disk", help="disk budget (default: free space in the offload dir)")
    pol.add_argument("--offload-dir", default=None, help="where disk-homed tensors go (default: system temp)")
    pol.add_argument("--io-threads", type=int, default=1,
                     help="threads reading and writing the offload dir (default 1: requests in schedule order)")


def quant_from_args(args: argparse.Namespace) -> dict:
    """Policy fields for --compress-* / --quant-bits / --group-size / --cache-keys."""
    from dataclasses import replace

    from .quant import WEIGHT_QUANT, KVQuantConfig
    over = {k: v for k, v in (("bits", args.quant_bits), ("group_size", args.group_size)) if v is not None}
    try:
        return {"compress_weight": args.compress_weight, "compress_cache": args.compress_cache,
                "weight_quant": replace(WEIGHT_QUANT, **over),
                "cache_quant": KVQuantConfig(**over, per_channel_keys=args.cache_keys == "channel")}
    except ValueError as e:
        raise TiergenError(f"bad quantization setting: {e}") from None


def policy_from_args(args: argparse.Namespace):  # -> Policy
    from .policy import Policy
    from .llm import resolve_device
    batch = args.gpu_batch_size
    if batch is None:
        batch = 32 if resolve_device(args.device).type == "cuda" else 256
    return Policy.from_percent(args.percent, gpu_batch_size=batch,
                               num_gpu_batches=args.num_gpu_batches, cpu_attention=args.cpu_attention,
                               schedule=args.schedule, overlap=not args.no_overlap,
                               pin_weight=not args.no_pin_weight, cache_dtype=args.cache_dtype,
                               **quant_from_args(args))


def load_llm(args: argparse.Namespace):  # -> LLM
    from .llm import LLM
    from .tiers import parse_bytes
    budgets = [parse_bytes(x) for x in (args.gpu_mem, args.cpu_mem, args.disk)]
    return LLM(args.model, dtype=args.dtype, device=args.device, dummy=args.dummy,
               policy=auto_from_args(args) if getattr(args, "policy", None) == "auto" else policy_from_args(args),
               offload_dir=args.offload_dir, offload_dtype=args.offload_dtype,
               gpu_mem=budgets[0], cpu_mem=budgets[1], disk=budgets[2], io_threads=args.io_threads)


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .tiers import fmt_bytes
    llm = load_llm(args)
    try:
        r = run_bench(llm, args.prompt_len, args.gen_len, num_prompts=args.num_prompts,
                      progress=not args.json and sys.stderr.isatty())
    finally:
        llm.close()
    if args.json:
        emit(json.dumps(r))
        return 0
    pol = r["policy"]
    stored = f", offloaded weights {r['offload_dtype']}" if r["offload_dtype"] != r["dtype"] else ""
    if pol["cache_dtype"] not in (None, r["dtype"]):
        stored += f", KV cache {pol['cache_dtype']}"
    emit(f"model {r['model']} ({r['dtype']}{stored}, {r['device']}), {r['num_prompts']} prompts x "
          f"{r['prompt_len']} tokens, {r['gen_len']} new tokens each")
    emit(f"policy {pol['gpu_batch_size']}x{pol['num_gpu_batches']} percent "
          f"{' '.join(f'{x:g}' for x in llm.policy.percent)} schedule {pol['schedule']} "
          f"overlap {pol['overlap']} cpu_attention {pol['cpu_attention']}")
    emit(f"prefill  {r['prefill_s']:9.3f} s  {r['prefill_tok_s']:10.1f} tok/s")
    emit(f"decode   {r['decode_s']:9.3f} s  {r['decode_tok_s']:10.1f} tok/s")
    emit(f"total    {r['total_s']:9.3f} s  {r['total_tok_s']:10.1f} tok/s  (generation throughput)")
    if pol["compress_weight"] or pol["compress_cache"]:
        def q(on: bool, c: dict) -> str:
            return f"{c['bits']}-bit g{c['group_size']}" if on else "off"
        emit(f"compression weights {q(pol['compress_weight'], pol['weight_quant'])}, "
              f"cache {q(pol['compress_cache'], pol['cache_quant'])}")
    for tier, peak in r["peaks"].items():
        w, wd = r["weights"][tier], r["weights_uncompressed"][tier]
        emit(f"peak {tier:5s} {fmt_bytes(peak):>12s} of {fmt_bytes(r['budgets'][tier])}   "
              f"weights {fmt_bytes(w)}" + (f" (uncompressed {fmt_bytes(wd)})" if w != wd else "")
              + f"   KV cache {fmt_bytes(r['kv_cache'][tier])}")
    kv = sum(r["kv_cache"].values())
    if kv and kv != r["kv_cache_uncompressed"]:
        emit(f"KV cache {fmt_bytes(kv)} stored, {fmt_bytes(r['kv_cache_uncompressed'])} uncompressed")
    for link, n in sorted(r["links"].items()):
        emit(f"moved {link:10s} {fmt_bytes(n):>12s}")
    return 0


def stdin_prompts() -> tuple[list[str], list[int]]:
    """Non-blank lines of stdin (a CR LF ending taken off too) and their line numbers."""
    prompts, lines = [], []
    for n, raw in enumerate(sys.stdin.buffer, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise TiergenError(f"stdin line {n} is not valid UTF-8 text") from None
        if line.strip():
            prompts.append(line)
            lines.append(n)
    return prompts, lines


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from .sampling import SamplingParams
    prompts = list(args.prompts)
    where = [f"argument {i + 1}" for i in range(len(prompts))]
    if not prompts and not sys.stdin.isatty():
        prompts, lines = stdin_prompts()
        where = [f"stdin line {n}" for n in lines]
    if not prompts:
        raise TiergenError("no prompts given (pass them as arguments or one per line on stdin)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                            stop_token_ids=args.stop_token_id or None, ignore_eos=args.ignore_eos,
                            min_tokens=args.min_tokens, include_stop_str_in_output=args.include_stop_str)

    def show(i: int, o) -> None:
        if args.json:
            emit(json.dumps({"index": i, "prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
                             "finish_reason": o.finish_reason}, ensure_ascii=False))
        else:
            emit(f"### {o.prompt}\n{o.text.strip()}\n")

    # Blocks finish in order of prompt length: each output is shown once every prompt before
    # it has been; when a block fails, the finished ones still come out, then the error.
    done: dict = {}
    shown = 0

    def finished(i: int, o) -> None:
        nonlocal shown
        done[i] = o
        while shown in done:
            show(shown, done.pop(shown))
            shown += 1

    llm = load_llm(args)
    t0 = time.perf_counter()
    try:
        outs = llm.generate(prompts, params, chat=args.chat, progress=not args.json and sys.stderr.isatty(),
                            on_output=finished)
    except (TiergenError, KeyboardInterrupt) as e:
        kept = shown + len(done)
        for i in sorted(done):
            show(i, done[i])
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e) + (f" ({where[e.prompt_index]})" if e.prompt_index is not None else "")
        if kept:
            msg += f"; the {kept} of {len(prompts)} prompts that had finished are written above"
        raise type(e)(msg) from None
    finally:
        llm.close()
    dt = time.perf_counter() - t0
    if not args.json:
        n = sum(len(o.token_ids) for o in outs)
        emit(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tok/s]", sys.stderr)
    return 0


@command("ppl")
def cmd_ppl(args: argparse.Namespace) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise TiergenError(f"no such file: {args.file}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TiergenError(f"cannot read {args.file}: {e}") from None
    llm = load_llm(args)
    t0 = time.perf_counter()
    try:
        r = llm.perplexity(text, window=args.window, stride=args.stride, progress=sys.stderr.isatty())
    finally:
        llm.close()
    dt = time.perf_counter() - t0
    if args.json:
        emit(json.dumps({"file": args.file, "ppl": r.ppl, "nll": r.nll, "num_tokens": r.num_tokens,
                          "seconds": dt}))
    else:
        emit(f"perplexity {r.ppl:.4f} over {r.num_tokens} tokens ({dt:.1f} s)")
    return 0


# ---------------------------------------------------------------- cost model (issue 5)

def auto_from_args(args: argparse.Namespace):  # -> Policy
    """bench --policy auto: the search for this run's prompt and generation lengths; the
    command line's flags (schedule, overlap, compression) are kept."""
    from .policy.cost_model import Workload
    from .policy.search import resolve_auto
    return resolve_auto("auto", args.model, dtype=args.dtype, device=args.device, dummy=args.dummy,
                        gpu_mem=args.gpu_mem, cpu_mem=args.cpu_mem, disk=args.disk, offload_dir=args.offload_dir,
                        offload_dtype=args.offload_dtype,
                        workload=Workload(args.prompt_len, args.gen_len), base=policy_from_args(args),
                        max_block=args.max_block)


@command("profile")
def cmd_profile(args: argparse.Namespace) -> int:
    from .policy.profile import ProfileSaveError, cached_profile, default_profile_path, load_profile
    if args.show:
        p = load_profile(args.show)
    else:
        log = (lambda m: print(f"[profile] {m}", file=sys.stderr))
        try:
            p = cached_profile(refresh=args.refresh, path=args.out, device=args.device,
                               offload_dir=args.offload_dir, log=log, must_save=args.out is not None)
        except ProfileSaveError as e:   # the measurement is not lost: it goes to stdout instead
            emit(json.dumps(e.profile.to_dict(), indent=1))
            raise TiergenError(f"{e}; the measured profile is written to stdout instead") from None
        print(f"profile: {args.out or default_profile_path()}", file=sys.stderr)
    if args.json:
        emit(json.dumps(p.to_dict(), indent=1))
        return 0
    from .policy.report import profile_lines
    emit("\n".join(profile_lines(p)))
    return 0


@command("plan")
def cmd_plan(args: argparse.Namespace) -> int:
    from .config import KNOWN_SHAPES, ModelConfig
    from .llm import resolve_dtype
    from .policy.cost_model import Workload
    from .policy.profile import cached_profile, load_profile
    from .policy.report import plan_lines
    from .policy.search import search, tiers_for_profile
    from .tiers import parse_bytes
    import torch
    prof = load_profile(args.profile) if args.profile else cached_profile()
    if args.model in KNOWN_SHAPES:
        cfg = ModelConfig.from_name(args.model)
    else:
        from .weights.source import resolve
        cfg = resolve(args.model, dummy=True).config
    budgets = [parse_bytes(x) for x in (args.gpu_mem, args.cpu_mem, args.disk)]
    dtype = resolve_dtype(args.dtype or ("float16" if prof.device == "cuda" else None),
                          torch.device(prof.device))
    wl = Workload(args.prompt_len, args.gen_len)
    plan = search(cfg, dtype, prof, wl, tiers_for_profile(prof, *budgets), compress=args.compress,
                  max_block=args.max_block)
    if args.json:
        emit(json.dumps({"profile": prof.name, "model": args.model, "tried": plan.tried,
                          "feasible": plan.feasible, **plan.prediction.to_dict()}))
        return 0
    emit("\n".join(plan_lines(args.model, prof, plan)))
    return 0


def add_plan_args(sub) -> None:
    pr = sub.add_parser("profile", help="measure this machine for the cost model (cached)")
    pr.add_argument("--refresh", action="store_true", help="measure again even if a cached profile exists")
    pr.add_argument("--out", default=None, help="where to write it (default: the user cache dir)")
    pr.add_argument("--show", default=None, metavar="FILE", help="print a profile file, measure nothing")
    pr.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    pr.add_argument("--offload-dir", default=None, help="where to measure the disk (default: system temp)")
    pr.add_argument("--json", action="store_true")
    pl = sub.add_parser("plan", help="pick a policy with the cost model and print its predicted breakdown")
    pl.add_argument("--model", "-m", default="smollm2-135m", help="known name, or a model dir / .gguf (shape only)")
    pl.add_argument("--profile", default=None, help="profile JSON (default: this machine's, measured if absent)")
    pl.add_argument("--prompt-len", type=int, default=512)
    pl.add_argument("--gen-len", type=int, default=32)
    pl.add_argument("--dtype", default=None, help="default: float16 on a cuda profile, else bfloat16")
    pl.add_argument("--gpu-mem", help="compute-device budget (default: the profile's)")
    pl.add_argument("--cpu-mem", help="host RAM budget (default: the profile's)")
    pl.add_argument("--disk", help="disk budget (default: the profile's)")
    pl.add_argument("--compress", action="store_true", help="also consider 4-bit weights and cache")
    pl.add_argument("--max-block", type=int, default=None, help="largest block (sequences) to consider")
    pl.add_argument("--json", action="store_true")


class Parser(argparse.ArgumentParser):
    """argparse with its mistakes on one line, as every other error (not the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tiergen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for prompts")
    add_model_args(g)
    g.add_argument("prompts", nargs="*", help="prompts (default: one per line on stdin)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--stop-token-id", type=int, action="append", help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--min-tokens", type=int, default=0, help="no stop before this many new tokens")
    g.add_argument("--include-stop-str", action="store_true", help="keep the stop string (or token) in the text")
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")

    b = sub.add_parser("bench", help="generation throughput of a policy on random prompts")
    add_model_args(b)
    b.add_argument("--prompt-len", type=int, default=512)
    b.add_argument("--gen-len", type=int, default=32)
    b.add_argument("--num-prompts", type=int, default=None, help="default: one block")
    b.add_argument("--json", action="store_true", help="one JSON object with every figure")

    p = sub.add_parser("ppl", help="perplexity of a text file (sliding window)")
    add_model_args(p)
    p.add_argument("file")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default window/2)")
    p.add_argument("--json", action="store_true")
    b.add_argument("--policy", choices=["auto"], default=None,
                   help="auto: the cost model picks the block shape and placement (tiergen plan)")
    b.add_argument("--max-block", type=int, default=256, help="with --policy auto: largest block considered")
    add_plan_args(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TiergenError as e:
        if isinstance(e, OutputError):   # nothing more can go out; keep the exit quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"tiergen: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:   # the file system's refusal (space, permissions), not a bug of ours
        where = f" ({e.filename})" if e.filename else ""
        print(f"tiergen: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tiergen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
