"""tiergen.tokenizer against transformers' own GGUF tokenizer conversion."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import pytest

from tiergen.tokenizer import load_tokenizer, tokenizer_from_gguf
from tiergen.weights.source import embedded_model_path
from tiergen.weights.gguf import GGUFFile


# The embedded model is a hard dependency of the suite: a missing package fails loudly.
SMOLLM = embedded_model_path()

TEXTS = [
    "Hello world",
    "Hello, world! How are you today?",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF \u00a0nbsp",
    "x²+y³ = 12345678, 3.14159, -42, 1e-9, 0xFF, 1,000,000",
    "naïve café Grüße 東京タワー Привет мир مرحبا 한국어",
    "emoji 🤖🎉👍🏽 👨‍👩‍👧 ok",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>plain<repo_name>text<|im_end|>",
    "don't I'm we'll they've IT'S",
    "",
    " ",
    "\n",
    "a" * 300,
    "😀" * 5,
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there 👋"}],
    [{"role": "user", "content": "Write code."},
     {"role": "assistant", "content": "print('hi')\n"},
     {"role": "user", "content": "Thanks!\n\n  More?"}],
]


def _ids(x: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list or a BatchEncoding."""
    return list(x["input_ids"]) if hasattr(x, "keys") else list(x)


def _reference(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def _assert_same_encoding(ours, ref, texts: list[str]) -> None:
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(
                text, add_special_tokens=special), (text, special)


# ------------------------------------------------------------- SmolLM2 (gpt2)
@pytest.fixture(scope="module")
def smol_meta() -> dict[str, Any]:
    with GGUFFile(SMOLLM) as f:
        return f.metadata


@pytest.fixture(scope="module")
def smol_ours(smol_meta: dict[str, Any]):
    return tokenizer_from_gguf(smol_meta)


@pytest.fixture(scope="module")
def smol_ref():
    return _reference(SMOLLM)


def test_smollm_ids_equal_transformers(smol_ours, smol_ref) -> None:
    _assert_same_encoding(smol_ours, smol_ref, TEXTS)
    assert len(smol_ours) == len(smol_ref) == 49152


def test_smollm_special_tokens(smol_ours, smol_ref) -> None:
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token",
                 "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(smol_ours, attr) == getattr(smol_ref, attr), attr
    assert smol_ours.encode("<|im_start|>") == [1]
    assert smol_ours.encode("<|im_end|>") == [2]
    assert smol_ours.add_bos_token is False


def test_smollm_decode_round_trips(smol_ours, smol_ref) -> None:
    for text in TEXTS:
        ids = smol_ours.encode(text)
        assert smol_ours.decode(ids) == text
        assert smol_ours.decode(ids) == smol_ref.decode(ids)
        assert smol_ours.decode(ids, skip_special_tokens=True) == smol_ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_smollm_chat_template(smol_ours, smol_ref, chat: int) -> None:
    msgs = CHATS[chat]
    text = smol_ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == smol_ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = _ids(smol_ours.apply_chat_template(msgs, add_generation_prompt=True))
    assert ids == _ids(smol_ref.apply_chat_template(msgs, add_generation_prompt=True))
    assert ids[0] == 1 and smol_ours.decode(ids) == text


def test_smollm_flags_from_metadata(smol_meta, smol_ours) -> None:
    eos_bos = tokenizer_from_gguf({**smol_meta, "tokenizer.ggml.add_bos_token": True,
                                   "tokenizer.ggml.add_eos_token": True})
    assert eos_bos.encode("hi") == [1, *smol_ours.encode("hi"), 2]
    assert eos_bos.add_bos_token and eos_bos.add_eos_token
    # a SentencePiece flag: llama.cpp (and transformers) do not read it for a BPE vocabulary
    spaced = tokenizer_from_gguf({**smol_meta, "tokenizer.ggml.add_space_prefix": True})
    assert spaced.encode("Hello world") == smol_ours.encode("Hello world") != smol_ours.encode(" Hello world")


def _respelled(meta: dict[str, Any], path: Path, **overrides: Any) -> Path:
    """The SmolLM2 vocabulary in a tensor-less GGUF, with some keys changed."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(overrides.get("model", "gpt2"))
    w.add_tokenizer_pre(overrides["pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    for key in ("bos", "eos", "unk"):
        getattr(w, f"add_{key}_token_id")(meta[f"tokenizer.ggml.{'unknown' if key == 'unk' else key}_token_id"])
    w.add_add_bos_token(overrides.get("add_bos", False))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_pre_tokenizer_variants_equal_transformers(smol_meta, tmp_path: Path, pre: str) -> None:
    path = _respelled(smol_meta, tmp_path / f"{pre}.gguf", pre=pre, add_bos=pre == "qwen2")
    with GGUFFile(path) as f:
        ours = tokenizer_from_gguf(f.metadata)
    ref = _reference(str(path))
    _assert_same_encoding(ours, ref, TEXTS)
    if pre == "qwen2":  # add_bos_token set: the BOS leads every encoding
        assert ours.encode("hi")[0] == ours.bos_token_id


# ----------------------------------------------- SentencePiece-style (llama)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Grüße aus München! Ça va? naïve café — 東京タワー 🙂 ",
    "def forward(self, hidden_states):\n    return self.proj(hidden_states) * 2\n",
    "In 1969, 600 million people watched the Moon landing; numbers like 3.14159 and 2,718 appear.",
    "Tokenizers split text into pieces; the pieces become ids, and the ids feed the model.",
]


def _spm_gguf(path: Path) -> Path:
    """A small llama-type vocab: byte tokens, controls, and BPE pieces learned
    from CORPUS, scored by merge rank as SentencePiece would."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=600, show_progress=False))
    learned = [p for p, _ in sorted(tk.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", "<|eot|>", "<tool>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3, 4] + [6] * 256
    scores = [0.0] * len(tokens)
    # The trainer numbers the alphabet first, then each merge's piece in merge
    # order: a merged piece scores -rank, single characters score lowest.
    merged = [p for p in learned if len(p) > 1]
    chars = [p for p in learned if len(p) == 1]
    tokens += merged + chars
    types += [1] * (len(merged) + len(chars))
    scores += [-float(rank) for rank in range(len(merged))] + [-1e6] * len(chars)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def spm_pair(tmp_path_factory: pytest.TempPathFactory):
    path = _spm_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf")
    with GGUFFile(path) as f:
        ours = tokenizer_from_gguf(f.metadata)
    return ours, _reference(str(path))


SPM_TEXTS = TEXTS + [
    "<s>user</s> hi <unk> there",
    "call <tool> now<|eot|>",
    "The quick brown fox, in München.",
    "unseen ✓ characters ⁂ fall back to bytes",
]


def test_spm_ids_equal_transformers(spm_pair) -> None:
    ours, ref = spm_pair
    _assert_same_encoding(ours, ref, SPM_TEXTS)
    ids = ours.encode("The quick brown fox")
    assert ids[0] == 1 and ours.add_bos_token is True  # llama vocabs get BOS by default
    assert ours.convert_ids_to_tokens(ids[1]).startswith("▁")  # the space prefix
    assert ours.encode("✓", add_special_tokens=False)[-3:] == [  # byte fallback: e2 9c 93
        ours.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "✓".encode()]


def test_spm_decode_and_special_tokens(spm_pair) -> None:
    ours, ref = spm_pair
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        if not text.startswith(" ") and "<" not in text:
            assert ours.decode(ids, skip_special_tokens=True) == text
    assert (ours.bos_token, ours.eos_token, ours.unk_token) == ("<s>", "</s>", "<unk>")


def test_spm_chat_template(spm_pair) -> None:
    ours, ref = spm_pair
    for msgs in CHATS:
        text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.endswith("[assistant] ")
        assert _ids(ours.apply_chat_template(msgs, add_generation_prompt=True)) == _ids(
            ref.apply_chat_template(msgs, add_generation_prompt=True))


def test_unsupported_tokenizer_model() -> None:
    from tiergen.errors import TiergenError

    with pytest.raises(TiergenError, match="unsupported GGUF tokenizer"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "rwkv", "tokenizer.ggml.tokens": ["a"]})


# ------------------------------------------------------------ load_tokenizer
def test_load_tokenizer_none_without_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
    assert load_tokenizer(tmp_path / "absent") is None


def test_load_tokenizer_from_gguf_and_hf_dir(smol_ours, tmp_path: Path) -> None:
    from_gguf = load_tokenizer(SMOLLM)
    smol_ours.save_pretrained(tmp_path)
    from_dir = load_tokenizer(tmp_path)
    assert from_gguf is not None and from_dir is not None
    for text in TEXTS:
        assert from_gguf.encode(text) == from_dir.encode(text) == smol_ours.encode(text)
    msgs = CHATS[1]
    assert from_dir.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        smol_ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


# ------------------------------------------------------------- stop strings
def _stop_at_reference(tok, ids: list[int], stops: list[str]) -> tuple[int, str] | None:
    """(tokens taken, text) where a stop string first appears, decoding the whole text after
    every token: what the Stopper's tail check must reproduce."""
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        hits = [i for s in stops if (i := text.find(s)) >= 0]
        if hits:
            return n, text[:min(hits)]
    return None


@pytest.mark.parametrize("vocab", ["smollm", "spm"])
def test_stop_strings_match_a_full_decode_after_every_token(vocab, smol_ours, spm_pair) -> None:
    import random

    from tiergen import SamplingParams
    from tiergen.sequence import Sequence, Stopper
    tok = smol_ours if vocab == "smollm" else spm_pair[0]
    rng = random.Random(0)
    checked = 0
    for text in TEXTS + SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        full = tok.decode(ids, skip_special_tokens=True)
        for _ in range(6 if full else 0):    # substrings anywhere: a leading space, a split character, the start
            a = rng.randrange(len(full))
            stops = [full[a:a + rng.randint(1, 6)], "never-in-these-texts"]
            seq = Sequence(0, [1], limit=len(ids))
            stopper = Stopper(SamplingParams(stop=stops), (), tok)
            for t in ids:
                stopper.push(seq, t)
            want = _stop_at_reference(tok, ids, stops)
            got = (len(seq.generated), seq.text) if seq.finish_reason == "stop" else None
            assert got == want, (text, stops)
            checked += want is not None
    assert checked > 50
