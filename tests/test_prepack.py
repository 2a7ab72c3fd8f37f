"""Resident layer weights packed for oneDNN (bfloat16, float32) compute exactly what plain ones do."""
import pytest
import torch

from tiergen import LLM, Policy, SamplingParams
from tiergen.weights import prepack, tiles
from tiergen.weights.tiered import head_kernel_serves

DTYPES = ["bfloat16", "float32"]


def need_packing(dtype: str) -> None:
    if not prepack.available(getattr(torch, dtype)):
        pytest.skip(f"this torch build cannot pack {dtype} weights for oneDNN")

PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]
PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)


def run(llm: LLM) -> tuple[list[list[int]], list[float]]:
    out = llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)
    return [o.token_ids for o in out], [s.logprob for s in llm.score(token_ids=PROMPTS)]


def packed_for_its_kernel(t, dtype: str) -> bool:
    """A resident CPU layer matrix is kept as AMX tiles where the tile kernel serves its dtype,
    else in oneDNN's layout."""
    if tiles.serves(getattr(torch, dtype)):
        return isinstance(t, tiles.TilePacked)
    return isinstance(t, torch.Tensor) and t.is_mkldnn


def is_plain(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_mkldnn


def assert_head_kept_for_its_kernel(llm):
    """A resident CPU head is packed in vocabulary slices for oneDNN, or kept plain where a
    head kernel reads it (bfloat16 on a CPU with AMX or AVX-512 BF16)."""
    head = llm.weights.homes["head"]["lm_head"].tensor
    if head_kernel_serves(llm.dtype):
        assert isinstance(head, torch.Tensor) and not head.is_mkldnn and head.dtype == torch.bfloat16
    else:
        assert isinstance(head, prepack.PackedRows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["opt", "llama_gqa", "qwen2", "mistral"])
def test_packed_weights_match_plain_bit_for_bit(name, dtype, hf_model_dirs, monkeypatch, tmp_path):
    need_packing(dtype)
    _, path = hf_model_dirs(name)
    packed = LLM(path, dtype=dtype, batch_size=4)
    layer = packed.weights.homes[0]
    mats = [k for k, h in layer.items() if len(h.shape) == 2]
    assert mats and all(packed_for_its_kernel(layer[k].tensor, dtype) for k in mats)
    assert all(is_plain(h.tensor) for h in packed.weights.homes["embed"].values())
    assert_head_kept_for_its_kernel(packed)
    got = run(packed)
    monkeypatch.setattr(prepack, "packable", lambda t: False)
    monkeypatch.setattr(tiles, "serves", lambda dtype: False)
    plain = LLM(path, dtype=dtype, batch_size=4)
    assert is_plain(plain.weights.homes[0][mats[0]].tensor)
    assert run(plain) == got
    monkeypatch.undo()
    # without a GPU, host-homed weights are computed with in place: packed too
    host = LLM(path, dtype=dtype, policy=Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=4))
    assert host.weights.homes[0][mats[0]].tier == "cpu" and packed_for_its_kernel(host.weights.homes[0][mats[0]].tensor, dtype)
    assert run(host) == got
    # disk-homed weights stream into plain buffers each block; they must agree as well
    disk = LLM(path, dtype=dtype, policy=Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=4),
               offload_dir=str(tmp_path))
    assert disk.weights.homes[0][mats[0]].tier == "disk"
    assert run(disk) == got


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_head_slices_compute_what_plain_slices_do(dtype):
    from tiergen.models.base import _vocab_logits, greedy_head
    need_packing(dtype)

    class Plain:
        def head_features(self, w, x):
            return x
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 64, generator=g).to(getattr(torch, dtype))
    w[700] = w[90]                       # a tie across slices: the lower id wins
    x = torch.randn(48, 64, generator=g).to(w.dtype)
    x[:4] = w[90]
    packed = prepack.PackedRows(w, 256)
    assert len(packed.parts) == 4 and packed.nbytes == w.nbytes
    plain_logits = torch.cat([prepack.packed_linear(x, w[s:s + 256]) for s in range(0, 1000, 256)], -1)
    assert torch.equal(_vocab_logits(x, packed), plain_logits)
    ids = greedy_head(Plain(), {"lm_head": packed}, x, slice_rows=256)
    assert torch.equal(ids, greedy_head(Plain(), {"lm_head": w}, x, slice_rows=256))
    assert torch.equal(ids, plain_logits.float().argmax(-1)) and (ids[:4] == 90).all()
    assert torch.equal(greedy_head(Plain(), {"lm_head": packed}, x), ids)    # unsliced: the slices' logits


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["llama_tied", "llama_gqa"])
def test_packed_head_is_counted_and_streamed_heads_agree(name, dtype, hf_model_dirs, tmp_path):
    from tiergen.memory_plan import weight_demand
    need_packing(dtype)
    _, path = hf_model_dirs(name)
    llm = LLM(path, dtype=dtype, batch_size=4)
    head = llm.weights.homes["head"]["lm_head"]
    assert_head_kept_for_its_kernel(llm)
    demand = weight_demand(llm.model, llm.dtype, llm.policy, llm.device)["gpu"]
    if head_kernel_serves(llm.dtype):   # the head kernel reads the plain rows: a tied head is the embedding itself
        assert "packed LM head" not in demand and (head.tensor is llm.weights.homes["embed"]["tok"].tensor) == llm.weights.tied
    else:
        # a tied head takes a packed copy beside the embedding's rows, charged to its tier; an untied one is replaced
        assert demand["packed LM head"] == (head.nbytes if llm.weights.tied else 0)
    shared = [h for h in llm.weights.homes["head"].values() if h.tensor is llm.weights.homes["embed"]["tok"].tensor]
    assert llm.weights.nbytes_by_tier()["gpu"] == sum(h.nbytes for hs in llm.weights.homes.values()
                                                       for h in hs.values()) - sum(h.nbytes for h in shared)
    got = run(llm)
    # the same head streamed from disk is plain, sliced the same way: the same tokens and scores
    disk = LLM(path, dtype=dtype, policy=Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=4),
               offload_dir=str(tmp_path))
    assert not isinstance(disk.weights.homes["head"]["lm_head"].tensor, prepack.PackedRows)
    assert run(disk) == got


def test_a_head_stored_at_another_dtype_is_cast_not_packed(hf_model_dirs):
    from tiergen.memory_plan import weight_demand
    need_packing("bfloat16")
    _, path = hf_model_dirs("llama_tied")
    policy = Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=4)
    llm = LLM(path, dtype="bfloat16", offload_dtype="float16", policy=policy)
    head = llm.weights.homes["head"]["lm_head"]
    assert head.tier == "cpu" and head.dtype == torch.float16 and not isinstance(head.tensor, prepack.PackedRows)
    demand = weight_demand(llm.model, torch.bfloat16, policy, llm.device, torch.float16)
    assert "packed LM head" not in demand["cpu"]
    out = llm.generate(prompt_token_ids=PROMPTS, params=PARAMS)
    assert all(len(o.token_ids) == PARAMS.max_new_tokens for o in out)


def test_narrower_stored_weights_are_not_packed(hf_model_dirs):
    _, path = hf_model_dirs("llama_gqa")
    # float32 compute over bfloat16 host copies: those are cast per block, not packed
    llm = LLM(path, dtype="float32", policy=Policy.from_percent([0, 100, 100, 0, 100, 0], gpu_batch_size=4),
              offload_dtype="bfloat16")
    homes = llm.weights.homes[0].values()
    assert any(h.dtype == torch.bfloat16 for h in homes) and not any(h.tensor.is_mkldnn for h in homes)


@pytest.mark.parametrize("packing", ["onednn", "tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("act", sorted(prepack.FUSED_ACTIVATIONS))
def test_fused_epilogues_match_eager_and_plain_weights_match_packed(act, dtype, packing, monkeypatch):
    from tiergen.models.base import ACTIVATIONS, linear, linear_act, linear_add, linear_gated
    if packing == "tiles":
        if not tiles.serves(dtype):
            pytest.skip(f"no AMX tile kernel for {dtype} products here")
        pack = tiles.TilePacked
    else:
        if not prepack.epilogues_available(dtype):
            pytest.skip(f"this torch build has no oneDNN post-ops for {dtype} products")
        monkeypatch.setattr(tiles, "kernel_for", lambda x, w: None)   # oneDNN for plain weights too
        pack = prepack.pack
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 64, generator=g).to(dtype)
    w = (torch.randn(96, 64, generator=g) * 0.1).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    other = torch.randn(37, 96, generator=g).to(dtype)
    tol = 2 ** -6 if dtype == torch.bfloat16 else 1e-5
    eager = {"act": ACTIVATIONS[act](torch.nn.functional.linear(x, w, b)),
             "gated": ACTIVATIONS[act](torch.nn.functional.linear(x, w[:48], b[:48]))
             * torch.nn.functional.linear(x, w[48:], b[48:]),
             "add": other + torch.nn.functional.linear(x, w, b), "linear": torch.nn.functional.linear(x, w, b)}
    for weight in (w, pack(w)):
        if packing == "onednn":
            assert prepack.fuses(x, weight)
        else:
            assert tiles.kernel_for(x, weight) is not None
        got = {"act": linear_act(x, weight, b, act), "gated": linear_gated(x, weight, b, act),
               "add": linear_add(x, weight, b, other), "linear": linear(x, weight, b)}
        for k in got:
            # one rounding instead of two: within a couple of ulps of the eager result
            torch.testing.assert_close(got[k].float(), eager[k].float(), rtol=tol, atol=tol)
        if weight is w:
            plain = got
        else:
            assert all(torch.equal(got[k], plain[k]) for k in got)   # streamed and resident layers agree
