"""Checkpoint tensors stacked into one matrix at load (tiergen/weights/fusion.py)."""
import pytest
import torch

from tiergen import LLM, CheckpointError
from tiergen.config import ModelConfig
from tiergen.models import get_model
from tiergen.weights.fusion import fuse_shapes, fuse_tensors

FUSION = {"w_qkv": ("wq", "wk", "wv"), "b_qkv": ("bq", "bk", "bv")}


def test_fuse_shapes_stacks_rows_where_the_first_part_stood():
    parts = {"norm": (8,), "wq": (8, 8), "wk": (4, 8), "wv": (4, 8), "wo": (8, 8)}
    assert list(fuse_shapes(parts, FUSION).items()) == [("norm", (8,)), ("w_qkv", (16, 8)), ("wo", (8, 8))]
    # a bias the config has not: its fusion is skipped
    assert "b_qkv" not in fuse_shapes(parts, FUSION)
    with pytest.raises(ValueError, match="w_qkv"):
        fuse_shapes({"wq": (8, 8), "wk": (4, 8)}, FUSION)      # a part missing from the family's own shapes
    with pytest.raises(ValueError, match="w_qkv"):
        fuse_shapes({"wq": (8, 8), "wk": (4, 6), "wv": (4, 8)}, FUSION)


def _stream(order):
    g = torch.Generator().manual_seed(0)
    t = {k: torch.randn(s, generator=g) for k, s in {"wq": (8, 8), "wk": (4, 8), "wv": (4, 8), "wo": (8, 8)}.items()}
    return t, [((0, k), t[k]) for k in order] + [(("head", "norm"), torch.ones(8))]


@pytest.mark.parametrize("order", [("wq", "wk", "wv", "wo"), ("wv", "wo", "wk", "wq")])
def test_fuse_tensors_stacks_in_the_fusion_order_whatever_the_file_order(order):
    t, stream = _stream(order)
    shapes = {0: {k: tuple(v.shape) for k, v in t.items()}, "head": {"norm": (8,)}}
    out = dict(fuse_tensors(iter(stream), FUSION, shapes, "test"))
    assert set(out) == {(0, "w_qkv"), (0, "wo"), ("head", "norm")}
    assert torch.equal(out[(0, "w_qkv")], torch.cat([t["wq"], t["wk"], t["wv"]]))


def test_fuse_tensors_names_a_missing_or_misshapen_part():
    t, stream = _stream(("wq", "wv", "wo"))
    shapes = {0: {k: tuple(v.shape) for k, v in t.items()}}
    with pytest.raises(CheckpointError, match="missing weight 'wk' of layer 0"):
        list(fuse_tensors(iter(stream), FUSION, shapes, "test"))
    bad = [((0, "wq"), torch.zeros(8, 8)), ((0, "wk"), torch.zeros(5, 8))]
    with pytest.raises(CheckpointError, match=r"'wk' of layer 0 has shape \(5, 8\), expected \(4, 8\)"):
        list(fuse_tensors(iter(bad), FUSION, shapes, "test"))


@pytest.mark.parametrize("family", ["smollm2-135m", "opt-125m"])
def test_stored_shapes_hold_every_checkpoint_parameter(family):
    model = get_model(ModelConfig.from_name(family))
    assert "w_qkv" in model.shapes()[0] and "wq" not in model.shapes()[0]
    total = lambda shapes: sum(torch.Size(s).numel() for g in shapes.values() for s in g.values())
    assert total(model.shapes()) == total(model.checkpoint_shapes())


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_loaded_qkv_is_the_checkpoints_projections_stacked(hf_model_dirs, name):
    hf, path = hf_model_dirs(name)
    llm = LLM(path, dtype="float32")
    attn = hf.model.layers[1].self_attn if name != "opt" else hf.model.decoder.layers[1].self_attn
    want = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    got = llm.weights.group(1)["w_qkv"]
    assert torch.equal(got.to_dense() if got.is_mkldnn else got, want)   # packed for oneDNN on a CPU
