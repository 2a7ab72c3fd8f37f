"""Real-text prompts for CPU throughput runs: token windows of CPython's pydoc topics.

``pydoc_data/topics.py`` ships with every CPython, so every machine has the same
text without a download. Prompts are consecutive, non-overlapping windows of
its tokens from the start of the file: deterministic for a given tokenizer.
"""
from __future__ import annotations

from typing import Any


def topics_text() -> str:
    import pydoc_data.topics as topics
    with open(topics.__file__, encoding="utf-8") as f:
        return f.read()


def token_windows(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """``n`` windows of ``length`` token ids each."""
    text = topics_text()
    need, chars = n * length, 4 * n * length   # ~3.5 chars per token on this text; grow if short
    while True:
        ids = list(tokenizer.encode(text[:chars], add_special_tokens=False))
        # drop the last few tokens: a cut at `chars` may have split a word
        ids = ids[:-8]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < need:
        raise ValueError(f"the text has only {len(ids)} tokens; {need} needed")
    return [ids[i * length:(i + 1) * length] for i in range(n)]
