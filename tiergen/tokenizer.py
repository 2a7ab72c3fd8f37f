"""Tokenizers: built straight from GGUF metadata, or loaded from a HF model dir.

Why build our own from GGUF: transformers' GGUF tokenizer path re-reads the
file and converts through its slow-tokenizer classes (seconds); the metadata
we already parsed holds everything a ``tokenizers.Tokenizer`` needs.

Two GGUF vocabularies are supported (``tokenizer.ggml.model``):
- ``gpt2``: byte-level BPE with merges; the pre-tokenizer split is chosen by
  ``tokenizer.ggml.pre`` (llama3, qwen2, smollm, ... differ).
- ``llama``: SentencePiece-style BPE over ``▁``-spelled pieces with byte
  fallback (``<0x0A>`` tokens); merges come from the file or, when absent,
  from the piece scores.
"""
from __future__ import annotations

import gc
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers

from .errors import CheckpointError, UnknownModelError

if TYPE_CHECKING:  # transformers costs ~1 s to import; only pay when building
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# llama.cpp token types (llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer splits of byte-level vocabularies, by tokenizer.ggml.pre.
# Each is the regex the vocabulary's merges were learned with.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "smaug-bpe", "dbrx"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}
# These split every digit apart, then apply the GPT-2 regex (what their HF
# tokenizer.json does with a Digits pre-tokenizer).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}

# Files whose presence makes a directory loadable by AutoTokenizer.
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable latin-1 bytes map to
    themselves, the other 68 to U+0100 onwards in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def _byte_level_model(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, (tok, ttype) in enumerate(zip(tokens, types)):
        # A normal token outside the byte alphabet is respelled so BPE can reach
        # it; special tokens keep their text, as they are matched verbatim.
        if ttype == NORMAL and not chars.issuperset(tok):
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", ())]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre in _DIGIT_SPLIT_PRES:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:  # "gpt2", "default" and anything unknown: the GPT-2 regex
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # tokenizer.ggml.add_space_prefix is not read here: llama.cpp applies it to SentencePiece
    # vocabularies only (and transformers' converter does the same)
    tk.decoder = decoders.ByteLevel()
    return tk


def _merges_from_scores(tokens: list[str], scores: list[float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE ranks a merge by the score of the piece it makes. For
    every piece, each split into two known pieces is a merge; ties go to the
    longer left part, then the longer right part, then the earlier piece (the
    order transformers' GGUF converter also produces)."""
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for index, (piece, score) in enumerate(zip(tokens, scores)):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -cut, cut - len(piece), index, left, right))
    ranked.sort(key=lambda r: r[:4])
    return [(r[4], r[5]) for r in ranked]


def _sentencepiece_model(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError("GGUF llama tokenizer has neither merges nor scores")
        # Control/byte/unused pieces are never produced by merging.
        merge_able = [t if ty in (NORMAL, USER_DEFINED) else "" for t, ty in zip(tokens, types)]
        merges = _merges_from_scores(merge_able, scores, vocab)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tk.decoder = decoders.Sequence(steps)
    return tk


def _token(tokens: list[str], meta: Mapping[str, Any], key: str) -> str | None:
    i = meta.get(f"tokenizer.ggml.{key}")
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC: building ~100k merge tuples otherwise triggers
    several full collections, which doubles the build time."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> "PreTrainedTokenizerFast":
    """A ready transformers tokenizer (encode, decode, apply_chat_template) from
    GGUF metadata as ``weights.gguf.GGUFFile.metadata`` gives it."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise CheckpointError("GGUF metadata has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    with _no_gc():
        if kind == "gpt2":
            tk = _byte_level_model(meta, tokens, types)
            default_bos = False
        elif kind == "llama":
            tk = _sentencepiece_model(meta, tokens, types)
            default_bos = True  # llama.cpp adds BOS to SentencePiece vocabs unless told not to
        else:
            raise UnknownModelError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    # Control (and unknown) tokens are special; user-defined ones are matched
    # whole but are ordinary text. Their ids already exist in the vocab.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN) and t]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == USER_DEFINED and t]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)

    bos, eos = _token(tokens, meta, "bos_token_id"), _token(tokens, meta, "eos_token_id")
    # add_bos_token / add_eos_token make transformers write the BOS/EOS
    # post-processor, and keep its flags truthful.
    return _wrap(
        tk, bos_token=bos, eos_token=eos,
        unk_token=_token(tokens, meta, "unknown_token_id"),
        pad_token=_token(tokens, meta, "padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None,
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None,
        clean_up_tokenization_spaces=False,
    )


def _wrap(tk: Tokenizer, **kwargs: Any) -> "PreTrainedTokenizerFast":
    from transformers import PreTrainedTokenizerFast

    # The public constructor deep-copies tokenizer_object (a JSON round trip,
    # ~0.2 s for a 49k vocab). transformers' own model tokenizers hand their
    # backend over by setting _tokenizer before __init__; we do the same, and
    # use the public path should a later transformers stop honouring it.
    wrapped = PreTrainedTokenizerFast.__new__(PreTrainedTokenizerFast)
    wrapped._tokenizer = tk
    try:
        wrapped.__init__(**kwargs)
    except ValueError:
        return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    return wrapped


def load_tokenizer(path_or_dir: str | os.PathLike) -> "PreTrainedTokenizerBase | None":
    """The tokenizer of a model: from a ``.gguf`` file's metadata, or with
    ``AutoTokenizer`` from a HF model dir that has tokenizer files; else None."""
    path = os.fspath(path_or_dir)
    if os.path.isfile(path) and path.endswith(".gguf"):
        from .weights.gguf import GGUFFile

        with GGUFFile(path) as f:
            return tokenizer_from_gguf(f.metadata)
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in _HF_TOKENIZER_FILES):
        return _auto_tokenizer(path)
    return None


def _auto_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """AutoTokenizer on a model dir, a broken tokenizer file refused in one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    # JSON and encoding errors are ValueErrors; a file of the wrong shape gives
    # KeyError/TypeError from transformers' parsing; unreadable files OSError.
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the tokenizer ({_reason(e)})") from None
    except Exception as e:
        # the tokenizers library's Rust side raises bare Exception ("data did not
        # match any variant ..."); any subclass is someone else's bug and goes on
        if type(e) is not Exception:
            raise
        raise CheckpointError(f"{path}: cannot read the tokenizer ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """An exception's message cut to its first line, for a one-line error."""
    text = str(e).strip()
    if isinstance(e, KeyError):   # str(KeyError) is just the quoted key
        text = f"no {text} entry"
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 200 else first[:197] + "..."
