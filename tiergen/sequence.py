"""Per-sequence generation state and stopping rules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import SamplingParams


@dataclass
class Sequence:
    index: int                    # position in the caller's request list
    prompt_ids: list[int]
    limit: int                    # new tokens allowed (max_new_tokens capped by the context)
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None       # set when a stop string cut it

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Output:
    """What ``LLM.generate`` returns per prompt."""
    prompt: Any
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" | "length"


class Stopper:
    """Applies EOS / stop token ids / stop strings / length to each sequence on its own."""

    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...], tokenizer: Any):
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= set(eos_ids)
        self.stop_ids = ids
        self.stop_strings = tuple(params.stop or ())
        self.include_stop = params.include_stop_str_in_output
        self.min_tokens = params.min_tokens
        self.tail_tokens = 4 * max(map(len, self.stop_strings), default=0) + 8
        self.tokenizer = tokenizer

    def push(self, seq: Sequence, token: int) -> None:
        if seq.done:
            return
        seq.generated.append(token)
        if len(seq.generated) < self.min_tokens:   # nothing stops a sequence this short (vLLM)
            if len(seq.generated) >= seq.limit:     # but the context
                seq.finish_reason = "length"
            return
        if token in self.stop_ids:   # kept in the ids, left out of the text (as vLLM does)
            seq.text = self.decode(seq.generated if self.include_stop else seq.generated[:-1])
            seq.finish_reason = "stop"
            return
        if self.stop_strings and self.tokenizer is not None and self._tail_hit(seq.generated):
            text = self.decode(seq.generated)
            # only an occurrence this token completed (vLLM's rule: one passed over during
            # min_tokens does not stop later); a partial character at the old end counts as new
            old = len(self.decode(seq.generated[:-1]).rstrip("\ufffd"))
            hits = sorted((i, -len(s)) for s in self.stop_strings
                          if (i := text.find(s, max(0, old - len(s) + 1))) >= 0)
            if hits:   # the earliest; with the stop string kept, the longest starting there
                at, neg_len = hits[0]
                seq.text = text[:at - neg_len if self.include_stop else at]
                seq.finish_reason = "stop"
                return
        if len(seq.generated) >= seq.limit:
            seq.finish_reason = "length"

    def banned(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, ids): the rows of a micro-batch still short of min_tokens, and the stop ids
        they may not draw yet; None when no row is."""
        if not self.min_tokens or not self.stop_ids:
            return None
        rows = [r for r, s in enumerate(seqs) if not s.done and len(s.generated) < self.min_tokens]
        if not rows:
            return None
        return torch.tensor(rows), torch.tensor(sorted(self.stop_ids))

    def _tail_hit(self, ids: list[int]) -> bool:
        """Whether the text's tail holds a stop string. Only one that this token completed can
        be new, and it lies in the last few tokens (a character takes at most 4 byte tokens);
        decoding just those keeps a long generation's checks linear instead of quadratic. The
        extra tokens before it keep the decode's start (a dropped leading space) off the string."""
        text = self.decode(ids[-self.tail_tokens:])
        return any(s in text for s in self.stop_strings)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def final_text(self, seq: Sequence) -> str:
        return seq.text if seq.text is not None else self.decode(seq.generated)
