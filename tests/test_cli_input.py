"""The command line on bad input and failing output: one line, a non-zero exit, finished work kept."""
import io
import json
import math
import os
import subprocess
import sys

import pytest

from tiergen import LLM, InvalidRequestError, PromptTooLongError, SamplingParams, cli
from tiergen.errors import DiskFullError
from tiergen.tiers import parse_bytes


def run_main(argv, capsys, stdin: bytes | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err.strip()


def one_line(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("tiergen"), err
    for w in words:
        assert w in err, err


def test_finished_prompts_are_written_when_a_later_block_fails(capsys, monkeypatch):
    """Blocks run shortest prompts first; the third block fails: the two finished outputs
    still come out (they were held back only to keep prompt order), then the error."""
    from tiergen.engine import Engine
    real, calls = Engine.generate_block, []

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise DiskFullError("disk full: no room for kv3.bin")
        return real(self, *a, **k)
    monkeypatch.setattr(Engine, "generate_block", failing)
    prompts = ["one two three four five six seven", "Hi", "Hello there"]   # the longest is prompt 0
    rc, out, err = run_main(["generate", "--json", "--max-new-tokens", "3", "--gpu-batch-size", "1", *prompts],
                            capsys)
    one_line(rc, err, "disk full", "2 of 3 prompts")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["index"] for r in rows] == [1, 2]
    assert [r["prompt"] for r in rows] == prompts[1:]
    assert all(len(r["token_ids"]) == 3 for r in rows)


def test_outputs_come_in_prompt_order(capsys):
    prompts = ["one two three four five six seven", "Hi", "Hello there"]
    rc, out, err = run_main(["generate", "--json", "--max-new-tokens", "2", "--gpu-batch-size", "1", *prompts],
                            capsys)
    assert rc == 0, err
    assert [json.loads(line)["index"] for line in out.splitlines()] == [0, 1, 2]


def test_a_full_stdout_is_one_line_and_leaves_no_traceback():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "tiergen.cli", "generate", "--max-new-tokens", "2", "Hi"],
                           stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    one_line(r.returncode, r.stderr.strip(), "cannot write the output", "No space left")


def test_stdin_lines_not_utf8_crlf_and_numbering(capsys, monkeypatch):
    rc, _, err = run_main(["generate", "--max-new-tokens", "1"], capsys, b"fine\n\xff\xfe bad\n", monkeypatch)
    one_line(rc, err, "stdin line 2", "UTF-8")
    # CR LF endings are taken off; blank lines are skipped but errors name the stdin line
    rc, out, err = run_main(["generate", "--json", "--max-new-tokens", "1"], capsys, b"Hello\r\n\nWorld\r\n",
                            monkeypatch)
    assert rc == 0, err
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["Hello", "World"]
    rc, _, err = run_main(["generate", "--max-new-tokens", "1"], capsys, b"ok\n\n" + b"word " * 9000 + b"\n",
                          monkeypatch)
    one_line(rc, err, "context", "stdin line 3")


def test_argument_not_utf8(capsys):
    bad = b"abc\xff".decode("utf-8", "surrogateescape")   # how Python hands such argv over
    rc, _, err = run_main(["generate", "--max-new-tokens", "1", "fine", bad], capsys)
    one_line(rc, err, "prompt 1", "UTF-8", "argument 2")


def test_argparse_mistakes_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--max-new-tokens", "abc", "x"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "--max-new-tokens" in err, err


@pytest.mark.parametrize("argv,words", [
    (["generate", "--device", "tpu", "x"], ["unsupported device 'tpu'"]),
    (["generate", "--device", "", "x"], ["unsupported device"]),
    (["generate", "--gpu-mem", "inf", "x"], ["bad memory size 'inf'"]),
    (["generate", "--gpu-mem=-5GiB", "x"], ["bad memory size '-5GiB'"]),
    (["generate", "--disk", "12XB", "x"], ["bad memory size '12XB'"]),
    (["generate", "--temperature", "nan", "x"], ["temperature"]),
    (["generate", "--temperature", "inf", "x"], ["temperature"]),
    (["generate", "--stop-token-id", "-3", "x"], ["stop token ids"]),
    (["generate", "--stop-token-id", "10000000", "x"], ["stop token id 10000000", "vocabulary"]),
    (["generate", "--gpu-batch-size", "0", "x"], ["gpu_batch_size"]),
    (["bench", "--prompt-len", "-4", "--gen-len", "2"], ["prompt length"]),
    (["bench", "--prompt-len", "8", "--gen-len", "0"], ["generation length"]),
    (["bench", "--prompt-len", "8", "--gen-len", "2", "--num-prompts", "0"], ["number of prompts"]),
])
def test_bad_values_are_refused(capsys, argv, words):
    rc, _, err = run_main(argv, capsys)
    one_line(rc, err, *words)


def test_offload_dir_that_is_a_file(capsys, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    rc, _, err = run_main(["generate", "--percent", "0", "0", "100", "0", "100", "0", "--offload-dir", str(f),
                           "--max-new-tokens", "1", "x"], capsys)
    one_line(rc, err, "offload dir", str(f))


def test_ppl_window_must_hold_two_tokens(smollm_path, tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text("The sun rises in the east and sets in the west. " * 4)
    for w in ("1", "0", "-5"):
        rc, _, err = run_main(["ppl", "--window", w, str(f)], capsys)
        one_line(rc, err, "window must be at least 2", f"got {w}")
    llm = LLM(smollm_path)
    with pytest.raises(InvalidRequestError, match="stride"):
        llm.perplexity("a b c d e f g h", window=4, stride=0)


def test_plan_refuses_what_cannot_be_planned(capsys, tmp_path):
    from tiergen.policy.cost_model import Workload
    base = ["plan", "--profile", PROFILE, "--model", "opt-1.3b"]
    for extra, words in ((["--prompt-len", "-5"], ["prompt length"]), (["--gen-len", "-5"], ["generation length"]),
                         (["--max-block", "0"], ["largest block"]), (["--max-block", "-3"], ["largest block"]),
                         (["--prompt-len", "100000"], ["context"])):
        rc, _, err = run_main(base + extra, capsys)
        one_line(rc, err, *words)
    with pytest.raises(InvalidRequestError):
        Workload(0, 8)


PROFILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "profiles", "t4_paper.json")


def _any_profile():
    from tiergen.policy.profile import load_profile
    return load_profile(PROFILE)


def test_profile_that_cannot_be_written_goes_to_stdout(capsys, monkeypatch, tmp_path):
    from tiergen.policy import profile as pr
    prof = _any_profile()
    monkeypatch.setattr(pr, "measure_profile", lambda **k: prof)
    target = tmp_path / "ro" / "p.json"
    target.parent.mkdir()

    def no_room(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pr.Path, "write_text", no_room)
    rc, out, err = run_main(["profile", "--out", str(target)], capsys)
    one_line(rc, err, "cannot write the profile", "No space left", "stdout")
    assert pr.profile_from_dict(json.loads(out)) == prof
    assert os.listdir(target.parent) == []   # no half-written temporary file left
    # as a cache (no --out), a write failure only warns: the run goes on with the profile
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert pr.cached_profile(refresh=True) == prof


def test_parse_bytes_and_sampling_values():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1e9") == 10**9 and parse_bytes("0") == 0
    for bad in ("nan", "inf", "-1", "12XB", "", -5, math.inf):
        with pytest.raises(InvalidRequestError):
            parse_bytes(bad)
    for t in (math.nan, math.inf, -0.5):
        with pytest.raises(InvalidRequestError):
            SamplingParams(temperature=t)
    with pytest.raises(PromptTooLongError):
        from tiergen.config import ModelConfig
        from tiergen.policy.cost_model import Workload
        from tiergen.policy.search import search, tiers_for_profile
        import torch
        p = _any_profile()
        search(ModelConfig.from_name("opt-1.3b"), torch.bfloat16, p, Workload(4000, 200), tiers_for_profile(p))
