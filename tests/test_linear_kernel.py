"""The layer-product kernels (tiergen/kernels/linear.cpp on AMX, linear_avx512.cpp on AVX-512
BF16) and the packed weights they read (weights/tiles.py)."""
import pytest
import torch
import torch.nn.functional as F

from tiergen import LLM, Policy, SamplingParams, kernels
from tiergen.weights import tiles

from checks import built_kernel

NEEDS = {"linear": "AMX BF16", "linear_avx512": "AVX-512 BF16"}
serving = pytest.mark.skipif(not tiles.serves(torch.bfloat16), reason="no bfloat16 product kernel on this CPU")

# (rows, columns, input dims): tails past 16/32 rows, 16/32 columns and 32 dims, SmolLM2's own,
# and rows over several of the kernel's L2-sized row panels (the last one partial), split by
# rows between the threads (over several groups of column pairs) or by columns
# (one and two rows: the AVX-512 kernel's few-rows steps)
SHAPES = [(1, 64, 33), (5, 17, 5), (16, 32, 64), (17, 100, 70), (33, 960, 576), (300, 576, 1536), (64, 3072, 576),
          (2100, 64, 576), (1100, 1024, 576), (600, 64, 4096), (96, 96, 4096), (2, 3072, 576), (1, 160, 7), (3, 40, 9)]


@pytest.fixture(params=kernels.LINEAR_KERNELS)
def mod(request):
    return built_kernel(request.param, NEEDS[request.param])


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
def test_products_are_the_exact_sums_rounded_once(mod, m, n, k):
    x, w, b, other = operands(m, n, k)
    exact = x.double() @ w.double().T + b.double()
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()
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
def test_tiles_and_plain_weights_give_the_same_bits_and_rows_do_not_depend_on_the_batch(mod, m, n, k):
    x, w, b, other = operands(m, n, k, seed=1)
    blocks = mod.pack(w)
    assert torch.equal(mod.unpack(blocks, n, k), w)
    for extra in ({}, {"bias": b}, {"bias": b, "other": other}):
        whole = mod.linear(x, blocks, n, **extra)
        assert torch.equal(whole, mod.linear(x, w, n, **extra))
        part = {key: v[1:m // 2 + 2] if key == "other" else v for key, v in extra.items()}
        assert torch.equal(mod.linear(x[1:m // 2 + 2], blocks, n, **part), whole[1:m // 2 + 2])


def test_rows_are_read_no_further_than_their_dims(mod):
    """An odd K's last pair and a strided x: what lies past a row's K dims (here NaN) is never summed."""
    for k in (5, 33, 577):
        x, w, b, _ = operands(9, 48, k, seed=3)
        wide = torch.full((9, k + 1), float("nan"), dtype=torch.bfloat16)
        wide[:, :k] = x
        got = mod.linear(wide[:, :k], w, 48, b)
        assert torch.isfinite(got.float()).all()
        assert torch.equal(got, mod.linear(x, w, 48, b))


def test_packing_is_one_layout_for_every_kernel(mod):
    """The packed weight is the same bytes whichever kernel packs it (weights/tiles.py keeps one)."""
    _, w, _, _ = operands(4, 100, 70, seed=4)
    blocks = mod.pack(w)
    assert blocks.shape == (8, 3, 16, 32)
    # block nb's pair p of column c: w[16 nb + c, 2p], w[16 nb + c, 2p + 1]; zeros past N and K
    flat = blocks.view(8, 48, 16, 2)
    assert torch.equal(flat[1, 5, 3], w[19, 10:12]) and torch.equal(flat[6, 34, 3], w[99, 68:70])
    assert not flat[6, 35:].any() and not flat[6, :, 4:].any() and not flat[7].any()


def test_the_kernel_refuses_what_it_cannot_compute(mod):
    x, w, b, other = operands(8, 48, 64)
    with pytest.raises(RuntimeError, match="gated"):
        mod.linear(x, w, 48, None, None, True)      # halves of 24: not whole 16-column blocks
    with pytest.raises(RuntimeError, match="matching x"):
        mod.linear(x[:, :32], w, 48)
    with pytest.raises(RuntimeError, match="residual"):
        mod.linear(x, w, 48, None, other[:, :40])


@serving
def test_products_of_any_rows_take_the_kernel_and_only_wide_inputs_do_not():
    x, w, b, other = operands(40, 96, 64)
    t = tiles.TilePacked(w)
    assert tiles.kernel_for(x, t) is not None and tiles.kernel_for(x, w) is not None
    assert tiles.kernel_for(torch.zeros(5000, 64, dtype=torch.bfloat16), t) is not None
    wide = torch.zeros(8, tiles.max_dims() + 1, dtype=torch.bfloat16)
    assert tiles.kernel_for(wide, wide) is None and not tiles.holds(wide) and tiles.holds(w)
    assert tiles.kernel_for(x.float(), w.float()) is None and not tiles.holds(w.float())
    assert torch.equal(tiles.plain(t), w) and tiles.plain(w) is w


PROMPTS = [[1, 17, 33, 99, 12, 7, 8, 9, 120, 200, 31, 64], [5, 6], list(range(10, 31)), [3] * 9]
PARAMS = SamplingParams(max_new_tokens=8, ignore_eos=True)


@serving
@pytest.mark.parametrize("name", ["llama_gqa", "opt"])
def test_layers_with_matrices_too_wide_for_tiles_agree_across_placements(name, hf_model_dirs, monkeypatch, tmp_path):
    """With the tile limit under the MLP's width, a layer's down matrix (160 dims in) stays with
    oneDNN while the rest are tiled; streamed matrices take the same kernels: same tokens."""
    _, path = hf_model_dirs(name)
    monkeypatch.setattr(tiles, "MAX_DIMS", dict.fromkeys(kernels.LINEAR_KERNELS, 100))
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


@serving
def test_a_gated_pair_off_the_column_blocks_is_rounded_then_gated_alike_for_every_placement():
    from tiergen.models.base import linear_gated
    x, w, b, _ = operands(20, 48, 64, seed=2)             # halves of 24 columns: not whole 16-column blocks
    assert not tiles.gated_fits(w)
    want = F.silu(F.linear(x.float(), w.float(), b.float())[:, :24]) * F.linear(x.float(), w.float(), b.float())[:, 24:]
    got = linear_gated(x, tiles.TilePacked(w), b, "silu")
    assert torch.equal(got, linear_gated(x, w, b, "silu"))
    torch.testing.assert_close(got.float(), want, rtol=2 ** -6, atol=2 ** -6)
