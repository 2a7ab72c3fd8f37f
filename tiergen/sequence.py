"""Per-sequence generation state and stopping rules."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        self.tail_tokens = 4 * max(map(len, self.stop_strings), default=0) + 8
        self.tokenizer = tokenizer

    def push(self, seq: Sequence, token: int) -> None:
        if seq.done:
            return
        seq.generated.append(token)
        if token in self.stop_ids:   # kept in the ids, left out of the text (as vLLM does)
            seq.text = self.decode(seq.generated[:-1])
            seq.finish_reason = "stop"
            return
        if self.stop_strings and self.tokenizer is not None and self._tail_hit(seq.generated):
            text = self.decode(seq.generated)
            hits = [i for s in self.stop_strings if (i := text.find(s)) >= 0]
            if hits:
                seq.text = text[:min(hits)]
                seq.finish_reason = "stop"
                return
        if len(seq.generated) >= seq.limit:
            seq.finish_reason = "length"

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
