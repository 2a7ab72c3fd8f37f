"""The AMX product kernel (tiergen/kernels/linear.cpp) and the tiled weights it reads (weights/tiles.py)."""
import pytest
import torch
import torch.nn.functional as F

from tiergen import LLM, Policy, SamplingParams
from tiergen.weights import tiles

pytestmark = pytest.mark.skipif(not tiles.serves(torch.bfloat16), reason="no AMX tile kernel on this CPU")

# (rows, columns, input dims): tails past 16/32 rows, 16/32 columns and 32 dims, SmolLM2's own,
# and rows over several of the kernel's L2-sized row panels (the last one partial), split by
# rows between the threads (over several groups of column pairs) or by columns
SHAPES = [(1, 64, 33), (5, 17, 5), (16, 32, 64), (17, 100, 70), (33, 960, 576), (300, 576, 1536), (64, 3072, 576),
          (2100, 64, 576), (1100, 1024, 576), (600, 64, 4096), (96, 96, 4096)]


def kernel():
    from tiergen import kernels
    return kernels.load("linear")


def operands(m: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    other = torch.randn(m, n, generator=g).bfloat16()
    return x, w, b, other


def within_a_rounding(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> None:
    """got is exact rounded once to bfloat16: half a unit of its last place, plus what float32
    sums in another order may differ by (``scale``: the sum of the terms' magnitudes)."""
    ulp = exact.abs().clamp_min(2 ** -100).log2().floor().exp2() * 2 ** -7
    assert ((got.double() - exact).abs() <= ulp / 2 + scale * 2 ** -20).all()


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_products_are_the_exact_sums_rounded_once(m, n, k):
    x, w, b, other = operands(m, n, k)
    exact = x.double() @ w.double().T + b.double()
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()
    mod = kernel()
    within_a_rounding(mod.linear(x, w, n, b), exact, scale)
    within_a_rounding(mod.linear(x, w, n, b, other), exact + other.double(), scale + other.double().abs())
    as_float = mod.linear(x, w, n, b, None, False, True)
    assert as_float.dtype == torch.float32
    assert ((as_float.double() - exact).abs() <= scale * 2 ** -20).all()
    if n % 32 == 0:
        g, u = exact.chunk(2, -1)
        sg, su = scale.chunk(2, -1)
        # silu is 1-Lipschitz-ish (|silu'| < 1.1): the sums' error carries through scaled
        within_a_rounding(mod.linear(x, w, n, b, None, True), F.silu(g) * u,
                          1.1 * sg * u.abs() + su * F.silu(g).abs() + 1e-6)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_tiles_and_plain_weights_give_the_same_bits_and_rows_do_not_depend_on_the_batch(m, n, k):
    x, w, b, other = operands(m, n, k, seed=1)
    mod, t = kernel(), tiles.TilePacked(w)
    assert torch.equal(t.dense(), w)
    for extra in ({}, {"bias": b}, {"bias": b, "other": other}):
        whole = mod.linear(x, t.blocks, n, **extra)
        assert torch.equal(whole, mod.linear(x, w, n, **extra))
        part = {key: v[1:m // 2 + 2] if key == "other" else v for key, v in extra.items()}
        assert torch.equal(mod.linear(x[1:m // 2 + 2], t.blocks, n, **part), whole[1:m // 2 + 2])


def test_the_kernel_refuses_what_it_cannot_compute():
    x, w, b, other = operands(8, 48, 64)
    mod = kernel()
    with pytest.raises(RuntimeError, match="gated"):
        mod.linear(x, w, 48, None, None, True)      # halves of 24: not whole 16-column blocks
    with pytest.raises(RuntimeError, match="matching x"):
        mod.linear(x[:, :32], w, 48)
    with pytest.raises(RuntimeError, match="residual"):
        mod.linear(x, w, 48, None, other[:, :40])


def test_products_of_any_rows_take_the_kernel_and_only_wide_inputs_do_not():
    x, w, b, other = operands(40, 96, 64)
    t = tiles.TilePacked(w)
    assert tiles.kernel_for(x, t) is not None and tiles.kernel_for(x, w) is not None
    assert tiles.kernel_for(torch.zeros(5000, 64, dtype=torch.bfloat16), t) is not None
    wide = torch.zeros(8, tiles.MAX_DIMS + 1, dtype=torch.bfloat16)
    assert tiles.kernel_for(wide, wide) is None and not tiles.holds(wide) and tiles.holds(w)
    assert tiles.kernel_for(x.float(), w.float()) is None and not tiles.holds(w.float())
    assert torch.equal(tiles.plain(t), w) and tiles.plain(w) is w


PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_layers_with_matrices_too_wide_for_tiles_agree_across_placements(name, hf_model_dirs, monkeypatch, tmp_path):
    """With the tile limit under the MLP's width, a layer's down matrix (160 dims in) stays with
    oneDNN while the rest are tiled; streamed matrices take the same kernels: same tokens."""
    _, path = hf_model_dirs(name)
    monkeypatch.setattr(tiles, "MAX_DIMS", 100)
    resident = LLM(path, dtype="bfloat16", batch_size=4)
    homes = resident.weights.homes[0]
    down = "w_down" if "w_down" in homes else "fc2_w"
    assert not isinstance(homes[down].tensor, tiles.TilePacked)
    assert sum(isinstance(h.tensor, tiles.TilePacked) for h in homes.values()) >= 2
    got = [o.token_ids for o in resident.generate(prompt_token_ids=PROMPTS, params=PARAMS)]
    disk = LLM(path, dtype="bfloat16", policy=Policy.from_percent([0, 0, 100, 0, 100, 0], gpu_batch_size=4),
               offload_dir=str(tmp_path))
    assert disk.weights.homes[0][down].tier == "disk"
    assert [o.token_ids for o in disk.generate(prompt_token_ids=PROMPTS, params=PARAMS)] == got


def test_a_gated_pair_off_the_column_blocks_is_rounded_then_gated_alike_for_every_placement():
    from tiergen.models.base import linear_gated
    x, w, b, _ = operands(20, 48, 64, seed=2)             # halves of 24 columns: not whole 16-column blocks
    assert not tiles.gated_fits(w)
    want = F.silu(F.linear(x.float(), w.float(), b.float())[:, :24]) * F.linear(x.float(), w.float(), b.float())[:, 24:]
    got = linear_gated(x, tiles.TilePacked(w), b, "silu")
    assert torch.equal(got, linear_gated(x, w, b, "silu"))
    torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=2 ** -6)
