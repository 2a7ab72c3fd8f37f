"""The ``tiergen`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from .errors import TiergenError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn
    return deco


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", default="smollm2-135m",
                   help="known name, HF model dir, .gguf file or cached Hub id (default: the embedded smollm2-135m)")
    g.add_argument("--dummy", action="store_true", help="random weights of the model's shape")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default bfloat16)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    g.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")


def load_llm(args: argparse.Namespace):  # -> LLM
    from .llm import LLM
    return LLM(args.model, dtype=args.dtype, device=args.device, dummy=args.dummy,
               batch_size=args.batch_size)


@command("generate")
def cmd_generate(args: argparse.Namespace) -> int:
    from .sampling import SamplingParams
    prompts = list(args.prompts)
    if not prompts and not sys.stdin.isatty():
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise TiergenError("no prompts given (pass them as arguments or one per line on stdin)")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                            stop_token_ids=args.stop_token_id or None, ignore_eos=args.ignore_eos)
    llm = load_llm(args)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, chat=args.chat, progress=not args.json and sys.stderr.isatty())
    dt = time.perf_counter() - t0
    for o in outs:
        if args.json:
            print(json.dumps({"prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
                              "finish_reason": o.finish_reason}, ensure_ascii=False))
        else:
            print(f"### {o.prompt}\n{o.text.strip()}\n")
    if not args.json:
        n = sum(len(o.token_ids) for o in outs)
        print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
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
    r = llm.perplexity(text, window=args.window, stride=args.stride, progress=sys.stderr.isatty())
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"file": args.file, "ppl": r.ppl, "nll": r.nll, "num_tokens": r.num_tokens,
                          "seconds": dt}))
    else:
        print(f"perplexity {r.ppl:.4f} over {r.num_tokens} tokens ({dt:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tiergen", description=__doc__)
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
    g.add_argument("--json", action="store_true", help="one JSON object per prompt")

    p = sub.add_parser("ppl", help="perplexity of a text file (sliding window)")
    add_model_args(p)
    p.add_argument("file")
    p.add_argument("--window", type=int, default=None, help="tokens per window (default min(context, 1024))")
    p.add_argument("--stride", type=int, default=None, help="tokens between windows (default window/2)")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TiergenError as e:
        print(f"tiergen: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tiergen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
