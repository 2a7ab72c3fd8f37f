"""Prefill and decode over a block of micro-batches, layer by layer.

A *block* is a list of micro-batches that advance together: every forward pass
(prefill, or one decode token) runs the schedule's (layer, micro-batch) steps,
so a layer's weights are fetched once per block. Weights come from a
``WeightStore``; the KV cache of each micro-batch is a ``KVCache``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Protocol

import torch

from . import host_heap
from .kv_cache import KVCache, Runtime
from .models.attention import build_mask
from .models.base import HEAD_SLICE_ROWS, Model, StepContext, Weights, greedy_head, head
from .policy import Policy, split_rows
from .sampling import SamplingParams, make_generators, sample
from .schedule import plan
from .sequence import Sequence, Stopper


# Without a GPU, token-wise layer work goes in row chunks whose widest
# intermediate is about this size, so it stays in the core's cache (MiBs of L2)
# instead of streaming through RAM, and the allocator reuses the same blocks
# instead of faulting in fresh pages for every tensor.
CPU_CHUNK_BYTES = 8 << 20


class WeightStore(Protocol):
    """Hands the engine each weight group on the compute device when it needs it."""

    def acquire(self, g: str | int) -> None: ...     # start fetching (asynchronously)
    def group(self, g: str | int) -> Weights: ...    # wait for it on the compute device
    def release(self, g: str | int) -> None: ...     # done with it for this pass


@dataclass
class MicroBatch:
    seqs: list[Sequence]
    cache: KVCache
    key_valid: torch.Tensor       # [B, max_len] bool: which cache columns hold real tokens
    next_pos: torch.Tensor        # [B] position id of each row's next token
    col: int                      # next cache column to write
    generators: list[torch.Generator] | None = None


def prompt_positions(mb: MicroBatch, width: int) -> torch.Tensor:
    """Position ids of a left-padded prompt: real tokens count from 0, so padding never shifts them."""
    return (mb.key_valid[:, :width].long().cumsum(-1) - 1).clamp(min=0)


class Engine:
    def __init__(self, model: Model, weights: WeightStore, rt: Runtime, policy: Policy):
        self.model, self.weights, self.rt, self.policy = model, weights, rt, policy
        self.cfg = model.cfg
        self.device, self.dtype = rt.device, rt.dtype
        self._plans: dict[int, list] = {}
        self._kv_count = 0
        self.chunk_rows, self.head_slice_rows = self._chunking()
        # how far the host heap may grow in a pass before freed memory goes back to the OS
        # (LLM raises it to the block's planned scratch where the budget has room)
        self.heap_limit = host_heap.GROWTH_LIMIT

    def _chunking(self) -> tuple[int | None, int | None]:
        """Rows per chunk for layers, vocabulary ids per slice of the greedy head (None:
        no chunking, on a GPU). The head weight is read once a step in slices rather than
        once per row chunk: a 49k x 576 head at 42-row chunks took 30 ms of a 200 ms
        SmolLM2 decode step."""
        if self.device.type == "cuda":
            return None, None
        elem = torch.empty((), dtype=self.dtype).element_size()
        widest = max(self.cfg.ffn_dim, self.cfg.hidden_size)
        return max(64, CPU_CHUNK_BYTES // (widest * elem)), HEAD_SLICE_ROWS

    # ------------------------------------------------------------- building
    def new_micro_batch(self, seqs: list[Sequence], extra_cols: int) -> tuple[MicroBatch, torch.Tensor]:
        """Left-pad the prompts into one micro-batch; returns it and the padded ids."""
        width = max(len(s.prompt_ids) for s in seqs)
        B, dev = len(seqs), self.device
        ids = torch.zeros(B, width, dtype=torch.long)
        valid = torch.zeros(B, width + extra_cols, dtype=torch.bool)
        for r, s in enumerate(seqs):
            n = len(s.prompt_ids)
            ids[r, width - n:] = torch.tensor(s.prompt_ids, dtype=torch.long)
            valid[r, width - n:width] = True
        lens = torch.tensor([len(s.prompt_ids) for s in seqs], dtype=torch.long)
        self._kv_count += 1
        cache = KVCache(self.cfg, B, width + extra_cols, self.policy.kv_dtype(self.dtype), self.rt,
                        shares=self.policy.shares("cache"), name=f"kv{self._kv_count}",
                        quant=self.policy.cache_quant if self.policy.compress_cache else None)
        mb = MicroBatch(seqs, cache, valid.to(dev), lens.to(dev), col=0)
        return mb, ids.to(dev)

    def _contexts(self, mb: MicroBatch, positions: torch.Tensor, num_new: int) -> dict[int | None, StepContext]:
        """The step's context for each sliding window the layers use (None: the whole
        context): one mask each, the family's per-step values (RoPE) computed once."""
        windows = dict.fromkeys(self.cfg.window(j) for j in range(self.cfg.num_layers))
        out: dict[int | None, StepContext] = {}
        for w in windows:
            mask = build_mask(mb.key_valid, mb.col, num_new, w)
            if out:
                out[w] = replace(next(iter(out.values())), mask=mask)
            else:
                out[w] = StepContext(positions=positions, start=mb.col, mask=mask, chunk_rows=self.chunk_rows)
                self.model.prepare(out[w])
        return out

    # ------------------------------------------------------------- forward
    def forward(self, mbs: list[MicroBatch], ids: list[torch.Tensor],
                positions: list[torch.Tensor], last_only: bool = False) -> list[torch.Tensor]:
        """Run new tokens ids[k] [B,T] of every micro-batch through all layers;
        returns the last hidden states and advances each cache. With ``last_only`` only each
        sequence's last position is wanted: the last layer may return [B,1,E]."""
        ctxs = [self._contexts(mb, p, x.shape[1]) for mb, p, x in zip(mbs, positions, ids)]
        last = [{w: replace(c, last_only=True) for w, c in cs.items()} for cs in ctxs] if last_only else ctxs
        self.weights.release("head")
        emb = self.weights.group("embed")
        hidden = [self.model.embed(emb, x, next(iter(cs.values()))) for x, cs in zip(ids, ctxs)]
        self.weights.release("embed")
        self.weights.acquire("head")
        acts = [Activation(h, self.rt, self.policy) for h in hidden]
        K = len(mbs)
        if K not in self._plans:
            self._plans[K] = plan(self.policy.schedule, self.cfg.num_layers, K, self.policy.overlap)
        for step in self._plans[K]:
            j, k = step.layer, step.micro_batch
            if step.op == "load_weight":
                self.weights.acquire(j)
            elif step.op == "load_cache":
                mbs[k].cache.layer(j).prefetch(mbs[k].col, ids[k].shape[1])
            elif step.op == "compute":
                ctx = (last[k] if j == self.cfg.num_layers - 1 else ctxs[k])[self.cfg.window(j)]
                out = self.model.layer(self.weights.group(j), acts[k].get(), ctx, mbs[k].cache.layer(j))
                acts[k].put(out)
            elif step.op == "release_weight":
                self.weights.release(j)
                host_heap.release_if_grown(self.heap_limit)   # a layer's worth of freed buffers
        for mb, x in zip(mbs, ids):
            mb.col += x.shape[1]
        return [a.take() for a in acts]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head(self.model, self.weights.group("head"), hidden).float()

    def finish(self, mbs: list[MicroBatch]) -> None:
        self.weights.release("head")
        for mb in mbs:
            mb.cache.close()

    # ------------------------------------------------------------- generation
    def prefill_hidden(self, mbs: list[MicroBatch], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Prompt pass; returns the last position's hidden state [B,1,E] per micro-batch."""
        positions = [prompt_positions(mb, x.shape[1]) for mb, x in zip(mbs, ids)]
        hidden = self.forward(mbs, ids, positions, last_only=True)
        return [h[:, -1:] for h in hidden]

    def decode_hidden(self, mbs: list[MicroBatch], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """One new token per sequence; returns its hidden state [B,1,E] per micro-batch."""
        for mb in mbs:
            mb.key_valid[:, mb.col] = True
        positions = [mb.next_pos[:, None] for mb in mbs]
        hidden = self.forward(mbs, [t[:, None].to(self.device) for t in tokens], positions)
        for mb in mbs:
            mb.next_pos += 1
        return hidden

    def prefill(self, mbs: list[MicroBatch], ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Prompt pass; returns next-token logits [B,V] per micro-batch."""
        return [self.logits(h)[:, 0] for h in self.prefill_hidden(mbs, ids)]

    def decode_step(self, mbs: list[MicroBatch], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """One new token per sequence; returns next-token logits [B,V] per micro-batch."""
        return [self.logits(h)[:, 0] for h in self.decode_hidden(mbs, tokens)]

    def next_tokens(self, hidden: torch.Tensor, params: SamplingParams, generators: list[torch.Generator] | None,
                    banned: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Next token per row of hidden [B,1,E], the ids ``banned`` (rows, ids) masked out.
        Greedy needs only each row's argmax, so on a CPU the head runs over vocabulary slices
        and the [B,V] logits never exist."""
        if params.greedy and banned is None:
            return greedy_head(self.model, self.weights.group("head"), hidden[:, 0], self.head_slice_rows).cpu()
        logits = self.logits(hidden)[:, 0]
        if banned is not None:
            rows, ids = (t.to(logits.device) for t in banned)
            logits[rows[:, None], ids] = -torch.inf
        return sample(logits, params, generators)

    def sample_next(self, mbs: list[MicroBatch], hidden: list[torch.Tensor], params: SamplingParams,
                    stopper: Stopper) -> list[torch.Tensor]:
        tokens = []
        for mb, h in zip(mbs, hidden):
            t = self.next_tokens(h, params, mb.generators, stopper.banned(mb.seqs))
            for s, tok in zip(mb.seqs, t.tolist()):
                stopper.push(s, tok)
            tokens.append(t)
        return tokens

    def generate_block(self, seqs_per_mb: list[list[Sequence]], params: SamplingParams,
                       stopper: Stopper, on_token: Any = None) -> None:
        """Generate for one block until every sequence has finished."""
        steps = max(s.limit for seqs in seqs_per_mb for s in seqs)
        if steps == 0:
            for seqs in seqs_per_mb:
                for s in seqs:
                    s.finish_reason = "length"
            return
        built = [self.new_micro_batch(seqs, steps) for seqs in seqs_per_mb]
        mbs = [m for m, _ in built]
        for mb in mbs:
            mb.generators = make_generators(params, [s.index for s in mb.seqs])
        tick = on_token or (lambda: None)
        try:
            tokens = self.sample_next(mbs, self.prefill_hidden(mbs, [x for _, x in built]), params, stopper)
            tick()
            for _ in range(steps - 1):
                if all(s.done for mb in mbs for s in mb.seqs):
                    break
                tokens = self.sample_next(mbs, self.decode_hidden(mbs, tokens), params, stopper)
                tick()
        finally:
            self.finish(mbs)

    # ------------------------------------------------------------- scoring
    def token_logprobs(self, seqs_per_mb: list[list[Sequence]]) -> Iterable[tuple[Sequence, torch.Tensor]]:
        """log p(token_i | tokens_<i) for i >= 1 of each prompt, float32 on the CPU."""
        built = [self.new_micro_batch(seqs, 0) for seqs in seqs_per_mb]
        mbs = [m for m, _ in built]
        ids = [x for _, x in built]
        positions = [prompt_positions(mb, x.shape[1]) for mb, x in zip(mbs, ids)]
        try:
            hidden = self.forward(mbs, ids, positions)
            yield from self._gather_logprobs(mbs, ids, hidden)
        finally:
            self.finish(mbs)

    def _gather_logprobs(self, mbs: list[MicroBatch], ids: list[torch.Tensor],
                         hidden: list[torch.Tensor]) -> Iterable[tuple[Sequence, torch.Tensor]]:
        for mb, x, h in zip(mbs, ids, hidden):
            for r, s in enumerate(mb.seqs):
                n = len(s.prompt_ids)
                if n < 2:
                    yield s, torch.zeros(0)
                    continue
                row = h[r:r + 1, x.shape[1] - n:-1]
                lp = self.logits(row)[0].log_softmax(-1)
                target = x[r, x.shape[1] - n + 1:]
                yield s, lp.gather(-1, target[:, None])[:, 0].cpu()


class Activation:
    """A micro-batch's hidden state between layers, homed per the policy's
    activation shares: host-homed rows are parked in host RAM between computes."""

    def __init__(self, h: torch.Tensor, rt: Runtime, policy: Policy):
        self.rt = rt
        g, c, d = split_rows(h.shape[0], policy.shares("act"))
        self.split = g
        self.host_rows = c + d
        self.value: torch.Tensor | None = None
        self.parked: torch.Tensor | None = None
        row = h[:1].nbytes
        self.bytes = {"gpu": g * row, "cpu": (c + d) * row}
        for tier, n in self.bytes.items():
            if n:
                rt.tiers[tier].alloc(n, "activations")
        self.put(h)

    def put(self, h: torch.Tensor) -> None:
        if self.host_rows and self.rt.mover.cuda:
            self.parked = h[self.split:].to("cpu", non_blocking=False)
            self.rt.tiers.links.add("gpu->cpu", self.parked.nbytes)
            self.value = h[:self.split]
        else:
            # without a GPU, host-homed rows already sit in host memory
            self.value = h

    def get(self) -> torch.Tensor:
        if self.parked is None:
            return self.value
        back, _ = self.rt.mover.to_compute(self.parked, "cpu->gpu")
        torch.cuda.current_stream().wait_stream(self.rt.mover.load_stream)
        self.parked = None
        return torch.cat([self.value, back], 0)

    def take(self) -> torch.Tensor:
        out = self.get()
        for tier, n in self.bytes.items():
            if n:
                self.rt.tiers[tier].free(n)
        self.bytes = {}
        return out
