"""The public entry point: ``LLM(model).generate(prompts, SamplingParams(...))``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence as Seq

import torch

from . import host_heap, kernels
from .cpu_dtype import faster_cpu_dtype
from .disk import IOPool, OffloadDir
from .engine import Engine
from .errors import InvalidRequestError, PolicyDoesNotFitError, PromptTooLongError, TiergenError
from .kv_cache import Runtime
from .memory_plan import block_demand, merged, pass_weight_demand, weight_demand
from .models import get_model
from .policy import Policy
from .policy.policy import DTYPE_NAMES
from .sampling import SamplingParams
from .sequence import Output, Sequence, Stopper
from .tiers import TIERS, Tiers, parse_bytes
from .transfer import Mover
from .weights import screen
from .weights.source import resolve
from .weights.tiered import TieredWeights

DTYPES = {**DTYPE_NAMES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Prompt = str | list[dict[str, str]]   # plain text, or chat messages


@dataclass(frozen=True)
class Score:
    """Sum of log p(token_i | tokens_<i) over the text's tokens after the first."""
    logprob: float
    num_tokens: int   # tokens whose log-probs are summed (the text's tokens minus the first)


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    nll: float        # total negative log-likelihood (nats)
    num_tokens: int   # tokens scored


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequestError(f"unsupported device {device!r} (use 'cpu' or 'cuda')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device={str(device)!r} requested but no CUDA GPU is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InvalidRequestError(f"device={str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"unsupported device {device!r} (use 'cpu' or 'cuda')")
    return dev


def resolve_store_dtype(offload_dtype: str | torch.dtype | None, checkpoint: torch.dtype | None,
                        dtype: torch.dtype) -> torch.dtype:
    """Precision of weights homed off the compute device. By default a checkpoint's own
    narrower dtype (a bfloat16 model computed in float32): offloaded bytes stay as small
    as the file's, and the compute device casts them once per block."""
    if offload_dtype is None or offload_dtype == "auto":
        if checkpoint is not None and checkpoint.is_floating_point and checkpoint.itemsize < dtype.itemsize:
            return checkpoint
        return dtype
    dt = offload_dtype if isinstance(offload_dtype, torch.dtype) else DTYPES.get(offload_dtype)
    if dt is None:
        raise InvalidRequestError(f"unsupported offload dtype {offload_dtype!r} (use float32, bfloat16 or float16)")
    return dt


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        # On a CPU the faster one (cpu_dtype.py; LLM falls back to bfloat16 if float32
        # does not fit). On a GPU, bfloat16.
        if device.type == "cpu":
            return faster_cpu_dtype()
        return torch.bfloat16
    if isinstance(dtype, torch.dtype):
        dt = dtype
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise InvalidRequestError(f"unsupported dtype {dtype!r} (use float32, bfloat16 or float16)")
    if dt == torch.float16 and device.type == "cpu":
        raise InvalidRequestError("float16 is supported on cuda only; use bfloat16 or float32 on the CPU")
    return dt


class LLM:
    """A model loaded for batch generation and scoring.

    ``model``: a known name (``smollm2-135m`` is the embedded default), a HF model
    dir, a ``.gguf`` file or a Hub id in the local cache. ``dummy=True`` gives random
    weights of the model's shape. ``policy`` places weights, KV cache and activations
    over the compute device, host RAM and disk (default: everything resident, in
    micro-batches of ``batch_size``); ``gpu_mem`` / ``cpu_mem`` / ``disk`` are the
    tiers' byte budgets (default: what the machine has free). ``batch_size`` defaults
    to 256 on a CPU, where bigger matmuls run much closer to its peak, and 32 on a GPU.
    ``offload_dtype`` is the precision of weights homed on the host or disk (default:
    the checkpoint's, when narrower than ``dtype``); they are cast once per block.
    ``io_threads`` serve the offload dir. One, the default, issues the schedule's
    reads and writes in the order it needs them; on the dev box's disk a 48x4 OPT-1.3B
    decode step took 2.75 s with one, 3.01 s with two and 3.11 s with four.
    """

    def __init__(self, model: str = "smollm2-135m", *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, dummy: bool = False, seed: int = 0,
                 policy: Policy | str | None = None, batch_size: int | None = None, num_micro_batches: int = 1,
                 schedule: str = "zigzag", offload_dir: str | None = None,
                 gpu_mem: int | str | None = None, cpu_mem: int | str | None = None,
                 disk: int | str | None = None, io_threads: int = 1,
                 offload_dtype: str | torch.dtype | None = None):
        if io_threads < 1:
            raise InvalidRequestError(f"io_threads must be at least 1, got {io_threads}")
        if isinstance(policy, str):
            # "auto": the cost model's pick for this model under these budgets (tiergen.policy.search)
            from .policy.search import resolve_auto
            policy = resolve_auto(policy, model, dtype=dtype, device=device, dummy=dummy, seed=seed,
                                  gpu_mem=gpu_mem, cpu_mem=cpu_mem, disk=disk, offload_dir=offload_dir,
                                  offload_dtype=offload_dtype)
        if policy is None:
            cpu = resolve_device(device).type == "cpu"
            batch_size = batch_size or (256 if cpu else 32)
            policy = Policy(gpu_batch_size=batch_size, num_gpu_batches=num_micro_batches, schedule=schedule)
        elif not isinstance(policy, Policy):
            raise InvalidRequestError(f"policy must be a tiergen.Policy, got {type(policy).__name__}")
        self.policy = policy
        self.batch_size, self.num_micro_batches = policy.gpu_batch_size, policy.num_gpu_batches
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        source = resolve(model, dummy=dummy, seed=seed)
        self.config = source.config
        self.model = get_model(self.config)
        self.tiers = Tiers(self.device, parse_bytes(gpu_mem), parse_bytes(cpu_mem), parse_bytes(disk),
                           offload_dir)
        # Refuse a policy that cannot fit before a single weight is read.
        self.store_dtype = resolve_store_dtype(offload_dtype, source.dtype, self.dtype)
        try:
            self.weight_demand = weight_demand(self.model, self.dtype, policy, self.device, self.store_dtype)
            self.tiers.check_fits(self.weight_demand)
        except PolicyDoesNotFitError:
            if dtype not in (None, "auto") or self.dtype != torch.float32:
                raise
            self.dtype = torch.bfloat16   # the automatic float32 choice must not cost a fit
            self.store_dtype = resolve_store_dtype(offload_dtype, source.dtype, self.dtype)
            self.weight_demand = weight_demand(self.model, self.dtype, policy, self.device, self.store_dtype)
            self.tiers.check_fits(self.weight_demand)
        needs_disk = policy.w_gpu_percent + policy.w_cpu_percent < 100 or \
            policy.cache_gpu_percent + policy.cache_cpu_percent < 100
        self.offload = OffloadDir(offload_dir) if needs_disk else None
        self.io = IOPool(io_threads)
        mover = Mover(self.device, self.tiers.links)
        self.runtime = Runtime(self.device, self.dtype, self.tiers, mover, self.io, self.offload,
                               cpu_attention=policy.cpu_attention)
        try:
            self.weights = TieredWeights(source, self.model, self.dtype, self.device, policy.shares("w"),
                                         self.tiers, self.offload, self.io, mover, pin=policy.pin_weight,
                                         quant=policy.weight_quant if policy.compress_weight else None,
                                         store=self.store_dtype)
            self.tokenizer = source.tokenizer()
        except BaseException:
            self.close()
            raise
        self.engine = Engine(self.model, self.weights, self.runtime, policy)
        kernels.warm(self.device.type == "cpu" or policy.cpu_attention, self.dtype)
        if self.device.type == "cpu":
            host_heap.reuse_freed_blocks()

    def close(self) -> None:
        """Remove offload files now (they are also removed at exit and on SIGTERM/SIGINT)
        and let go of the KV cache buffers kept for the next call."""
        self.runtime.kept.drop(self.tiers)
        self.io.shutdown()
        if self.offload is not None:
            self.offload.close()

    def memory_report(self) -> dict[str, Any]:
        """Per-tier budget / current / peak bytes, bytes moved per link; weight bytes per
        tier as stored (compressed or not) and uncompressed; the KV cache's peak home
        bytes per tier, and that peak uncompressed."""
        rep = self.tiers.report()
        rep["weights"] = self.weights.nbytes_by_tier()
        rep["weights_uncompressed"] = self.weights.nbytes_by_tier(dense=True)
        rt = self.runtime
        rep["kv_cache"] = dict(rt.kv_peak)
        rep["kv_cache_uncompressed"] = rt.kv_dense_peak
        return rep

    # ------------------------------------------------------------- tokens
    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; pass prompt_token_ids instead of text")
        return self.tokenizer

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        tok = self._need_tokenizer()
        _check_text(prompt)
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if not getattr(tok, "chat_template", None):
                raise InvalidRequestError("this model has no chat template")
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(tok.encode(text, add_special_tokens=False))
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
        return list(tok.encode(prompt))

    def _encode_nth(self, i: int, prompt: Prompt, chat: bool) -> list[int]:
        try:
            return self.encode(prompt, chat)
        except TiergenError as e:
            raise type(e)(f"prompt {i}: {e}", prompt_index=i) from None

    def _check_ids(self, ids: list[list[int]], room: int) -> None:
        V, ctx = self.config.vocab_size, self.config.context_length
        for i, p in enumerate(ids):
            if not p:
                raise InvalidRequestError(f"prompt {i} is empty", prompt_index=i)
            if min(p) < 0 or max(p) >= V:
                raise InvalidRequestError(f"prompt {i} has token ids outside the vocabulary [0, {V})",
                                          prompt_index=i)
            if len(p) + room > ctx:
                raise PromptTooLongError(
                    f"prompt {i} has {len(p)} tokens; the context is {ctx}"
                    + (" and at least one new token must fit" if room else ""), prompt_index=i)

    def _blocks(self, seqs: list[Sequence]) -> Iterator[list[list[Sequence]]]:
        """Blocks of micro-batches; similar lengths together so padding stays small."""
        order = sorted(seqs, key=lambda s: len(s.prompt_ids))
        mb = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for i in range(0, len(mb), self.num_micro_batches):
            yield mb[i:i + self.num_micro_batches]

    def _check_block_fits(self, blocks: list[list[list[Sequence]]], new_tokens: int) -> None:
        """Refuse, before any work, a block whose cache and activations overflow a tier."""
        width = max(len(s.prompt_ids) for b in blocks for mb in b for s in mb)
        rows = max(len(mb) for b in blocks for mb in b)
        # beside the block, the buffers the weights pass through while the block runs
        demand = merged(block_demand(self.config, self.dtype, self.policy, self.device, rows, len(blocks[0]),
                                     width, new_tokens), pass_weight_demand(self.weight_demand))
        try:
            self.tiers.check_fits(demand)
        except PolicyDoesNotFitError:
            mine = [self.tiers[t] for t in TIERS]
            if not self.runtime.kept.bufs and not screen.holding(mine):
                raise
            self.runtime.kept.drop(self.tiers)   # the last call's cache buffers, kept for reuse, go first
            screen.release(mine)                 # and the greedy head's codes (made again where they fit)
            self.tiers.check_fits(demand)
        if self.device.type == "cpu":
            # a pass's freed scratch stays in the heap for the next layer, as far as the budget allows
            self.engine.heap_limit = max(host_heap.GROWTH_LIMIT, min(
                2 * demand["gpu"]["compute scratch"], self.tiers.host_headroom(demand)))

    # ------------------------------------------------------------- generate
    @torch.inference_mode()
    def generate(self, prompts: Prompt | Seq[Prompt] | None = None,
                 params: SamplingParams | None = None, *,
                 prompt_token_ids: Seq[Seq[int]] | None = None, chat: bool = False,
                 progress: bool = False, on_step: Any = None,
                 on_output: Callable[[int, Output], None] | None = None) -> list[Output]:
        """``on_step`` is called after every forward pass of every block (prefill first);
        ``on_output(i, output)`` as soon as prompt i's block has finished, so a caller keeps
        what is done even if a later block fails."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be one SamplingParams for all prompts, got {type(params).__name__}")
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]  # type: ignore[list-item]
        if prompt_token_ids is not None:
            ids = [list(map(int, p)) for p in prompt_token_ids]
            shown: list[Any] = list(prompts) if prompts is not None else [None] * len(ids)
        elif prompts is not None:
            shown = list(prompts)
            ids = [self._encode_nth(i, p, chat) for i, p in enumerate(shown)]
        else:
            raise InvalidRequestError("generate() needs prompts or prompt_token_ids")
        self._check_ids(ids, room=1 if params.max_new_tokens else 0)
        if params.stop_token_ids and max(params.stop_token_ids) >= self.config.vocab_size:
            raise InvalidRequestError(f"stop token id {max(params.stop_token_ids)} is outside the vocabulary "
                                      f"[0, {self.config.vocab_size})")
        ctx = self.config.context_length
        seqs = [Sequence(i, p, min(params.max_new_tokens, ctx - len(p))) for i, p in enumerate(ids)]
        stopper = Stopper(params, self.config.eos_token_ids, self.tokenizer)
        bar = _progress(progress, sum(s.limit for s in seqs), "generate")
        blocks = list(self._blocks(seqs))
        self._check_block_fits(blocks, max(s.limit for s in seqs))

        def output(s: Sequence) -> Output:
            return Output(prompt=shown[s.index], prompt_token_ids=s.prompt_ids, text=stopper.final_text(s),
                          token_ids=list(s.generated), finish_reason=s.finish_reason or "length")
        done: dict[int, Output] = {}
        for block in blocks:
            n = sum(len(m) for m in block)
            def tick(n: int = n) -> None:
                if bar:
                    bar.update(n)
                if on_step:
                    on_step()
            self.engine.generate_block(block, params, stopper, on_token=tick)
            for s in sorted((s for mb in block for s in mb), key=lambda s: s.index):
                done[s.index] = output(s)   # each text decoded once, when its block is done
                if on_output:
                    on_output(s.index, done[s.index])
        if bar:
            bar.close()
        return [done[i] for i in range(len(seqs))]

    # ------------------------------------------------------------- scoring
    @torch.inference_mode()
    def token_logprobs(self, token_ids: Seq[Seq[int]]) -> list[torch.Tensor]:
        ids = [list(map(int, p)) for p in token_ids]
        self._check_ids(ids, room=0)
        seqs = [Sequence(i, p, 0) for i, p in enumerate(ids)]
        out: list[torch.Tensor] = [torch.zeros(0)] * len(seqs)
        blocks = list(self._blocks(seqs))
        self._check_block_fits(blocks, 0)
        for block in blocks:
            for s, lp in self.engine.token_logprobs(block):
                out[s.index] = lp
        return out

    def score(self, texts: Seq[str] | None = None, *,
              token_ids: Seq[Seq[int]] | None = None) -> list[Score]:
        if token_ids is None:
            if texts is None:
                raise InvalidRequestError("score() needs texts or token_ids")
            token_ids = [self.encode(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return [Score(float(lp.double().sum()), int(lp.numel())) for lp in self.token_logprobs(token_ids)]

    def perplexity(self, text: str | None = None, *, token_ids: Seq[int] | None = None,
                   window: int | None = None, stride: int | None = None,
                   progress: bool = False) -> Perplexity:
        """Sliding-window perplexity: each window scores only the tokens after the
        previous window's end, with up to ``window - stride`` tokens of context."""
        ids = list(token_ids) if token_ids is not None else self.encode(text or "")
        if window is not None and window < 2:
            raise InvalidRequestError(f"window must be at least 2 tokens, got {window}")
        window = min(window or min(self.config.context_length, 1024), self.config.context_length)
        stride = max(1, window // 2) if stride is None else stride
        if not 0 < stride <= window:
            raise InvalidRequestError(f"stride must be in [1, window={window}], got {stride}")
        if len(ids) < 2:
            raise InvalidRequestError("the text has fewer than 2 tokens; nothing to score")
        spans, prev_end = [], 0
        for begin in range(0, len(ids), stride):
            end = min(begin + window, len(ids))
            new = end - max(prev_end, begin + 1)    # never score a window's first token
            spans.append((begin, end, new))
            prev_end = end
            if end == len(ids):
                break
        nll, count = 0.0, 0
        bar = _progress(progress, len(spans), "ppl")
        chunk = self.batch_size * self.num_micro_batches
        for i in range(0, len(spans), chunk):
            part = spans[i:i + chunk]
            for (b, e, new), lp in zip(part, self.token_logprobs([ids[b:e] for b, e, _ in part])):
                nll -= float(lp[len(lp) - new:].double().sum())
                count += new
            if bar:
                bar.update(len(part))
        if bar:
            bar.close()
        return Perplexity(ppl=math.exp(nll / count), nll=nll, num_tokens=count)


def _check_text(prompt: Prompt) -> None:
    """Python keeps bytes that were not UTF-8 (in argv, or a file opened with surrogateescape)
    as lone surrogates, which no tokenizer takes: refuse them by name."""
    if isinstance(prompt, str):
        texts = [prompt]
    else:
        texts = [m.get("content") for m in prompt if isinstance(m, dict)] if isinstance(prompt, list) else []
    for t in texts:
        if isinstance(t, str):
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequestError("not valid UTF-8 text") from None


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok" if desc == "generate" else "win", leave=False)
