"""Bad input: one-line CLI errors with a non-zero exit, specific exceptions from the API."""
import json
import os
import subprocess
import sys

import pytest

from tiergen import (LLM, CheckpointError, InvalidRequestError, ModelNotFoundError, PromptTooLongError,
                     SamplingParams, UnknownModelError)


def run_cli(*args, stdin=""):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    return subprocess.run([sys.executable, "-m", "tiergen.cli", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("tiergen: error:")
    for w in words:
        assert w in err, err


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory, smollm_path):
    d = tmp_path_factory.mktemp("broken")
    with open(smollm_path, "rb") as f:
        head = f.read(4_000_000)
    (d / "truncated.gguf").write_bytes(head)
    (d / "magic.gguf").write_bytes(b"GGUX" + head[4:1000])
    (d / "empty.gguf").write_bytes(b"")
    st = d / "st"
    st.mkdir()
    (st / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=8, max_position_embeddings=32)))
    (st / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    bad_cfg = d / "badcfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text("{oops")
    return d


@pytest.mark.parametrize("name,exc,word", [
    ("truncated.gguf", CheckpointError, "truncated"),
    ("magic.gguf", CheckpointError, "magic"),
    ("empty.gguf", CheckpointError, "empty.gguf"),
    ("st", CheckpointError, "safetensors"),
    ("badcfg", CheckpointError, "JSON"),
])
def test_corrupt_checkpoints(broken_files, name, exc, word):
    path = str(broken_files / name)
    with pytest.raises(exc):
        LLM(path)
    assert_one_line_error(run_cli("generate", "--model", path, "hi"), name)


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError):
        LLM(str(tmp_path / "nope.gguf"))
    with pytest.raises(UnknownModelError):
        LLM("definitely-not-a-model")
    assert_one_line_error(run_cli("generate", "--model", str(tmp_path / "nope"), "hi"), "nope")
    assert_one_line_error(run_cli("generate", "--model", "definitely-not-a-model", "hi"), "unknown model")
    assert_one_line_error(run_cli("ppl", str(tmp_path / "missing.txt")), "missing.txt")


def test_known_shape_without_weights_says_dummy(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="dummy"):
        LLM("opt-125m")


def test_prompt_longer_than_context(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")     # context 256
    llm = LLM(path, dtype="float32")
    with pytest.raises(PromptTooLongError):
        llm.generate(prompt_token_ids=[[3] * 300])
    with pytest.raises(PromptTooLongError):
        llm.generate(prompt_token_ids=[[3] * 256])      # no room for one new token
    out = llm.generate(prompt_token_ids=[[3] * 250], params=SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert len(out[0].token_ids) == 6 and out[0].finish_reason == "length"   # capped by the context
    with pytest.raises(InvalidRequestError):
        llm.generate(prompt_token_ids=[[3, 999]])       # outside the vocabulary
    with pytest.raises(InvalidRequestError):
        llm.generate(["text"])                          # this random model has no tokenizer


def test_cli_prompt_too_long_is_one_line():
    r = run_cli("generate", "--max-new-tokens", "1", "word " * 9000)
    assert_one_line_error(r, "context")


def test_bad_sampling_params():
    for kw in [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2), dict(max_new_tokens=-1)]:
        with pytest.raises(InvalidRequestError):
            SamplingParams(**kw)
    assert_one_line_error(run_cli("generate", "--top-p", "2", "hi"), "top_p")


def test_io_threads_must_be_positive():
    assert_one_line_error(run_cli("bench", "--dummy", "--model", "opt-125m", "--io-threads", "0"), "io_threads")


def test_fp16_refused_on_cpu():
    with pytest.raises(InvalidRequestError):
        LLM("opt-125m", dummy=True, dtype="float16", device="cpu")


def test_cli_generate_json_and_text():
    r = run_cli("generate", "--json", "--max-new-tokens", "8", "The capital of France is", "1, 2, 3,")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) >= {"text", "token_ids", "finish_reason"} and row["finish_reason"] in ("stop", "length")
        assert 1 <= len(row["token_ids"]) <= 8


def test_cli_ppl(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("The sun rises in the east and sets in the west. " * 6)
    r = run_cli("ppl", "--json", "--window", "32", str(f))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 1.0 < res["ppl"] < 50 and res["num_tokens"] > 50
