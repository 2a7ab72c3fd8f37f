"""The LM-head kernels (AMX tiles, AVX-512 BF16 dot products): float32 logits of bfloat16
features from the weight's plain rows, and the greedy argmax of exactly those logits (ties to
the lowest id), for any shape and stride."""
import pytest
import torch

from tiergen import kernels
from tiergen.models.base import greedy_head, head, head_kernel

from checks import built_kernel

NEEDS = {"lm_head": "AMX BF16", "lm_head_avx512": "AVX-512 BF16"}


@pytest.fixture(params=kernels.HEAD_KERNELS)
def mod(request):
    return built_kernel(request.param, NEEDS[request.param])


class Plain:
    """A family whose final features are its input."""
    def head_features(self, w, x):
        return x


def case(N, V, K, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N + 2, K + 3, generator=g).bfloat16()[1:N + 1, 2:K + 2]     # strided rows
    w = (torch.randn(V + 1, K + 5, generator=g) * 0.05).bfloat16()[:V, :K]
    return h, w


@pytest.mark.parametrize("N,V,K", [(1, 17, 64), (5, 1000, 80), (33, 777, 576), (256, 4099, 576), (600, 100, 40), (70, 50, 33)])
def test_logits_are_the_float32_products(mod, N, V, K):
    h, w = case(N, V, K, seed=N + V + K)
    got = mod.logits(h, w)
    want = h.double() @ w.double().T
    assert got.dtype == torch.float32 and got.shape == (N, V)
    # float32 sums of exact bfloat16 products: far inside a bfloat16 step of the logits
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("N,V,K", [(1, 17, 64), (7, 1000, 80), (256, 4099, 576), (600, 100, 40), (19, 61, 33)])
def test_argmax_is_of_the_float32_logits_with_ties_to_the_lowest_id(mod, N, V, K):
    h, w = case(N, V, K, seed=3 * N + V)
    w[V - 1] = w[V // 3]                     # an exact tie across the vocabulary
    h[0] = w[V // 3] * 8                     # row 0 prefers that row: the tie decides it
    got = mod.argmax(h, w)
    assert got.dtype == torch.long and got.shape == (N,)
    assert torch.equal(got, mod.logits(h, w).argmax(-1)) and got[0] == V // 3
    assert torch.equal(got, (h.double() @ w.double().T).argmax(-1))


def test_argmax_separates_what_bfloat16_rounding_ties(mod):
    # logits 25.375 and 25.390625: one bfloat16 value once rounded (its step there is 0.125),
    # where a bfloat16 head would hand the tie to id 0
    h = torch.zeros(2, 64).bfloat16()
    h[:, 0], h[:, 1] = 1.0, 2.0 ** -6
    w = torch.zeros(2, 64).bfloat16()
    w[:, 0] = 25.375
    w[1, 1] = 1.0
    logits = mod.logits(h, w)
    assert logits[0, 1] - logits[0, 0] == 2.0 ** -6
    assert logits.bfloat16()[0, 0] == logits.bfloat16()[0, 1] and logits.bfloat16().argmax(-1)[0] == 0
    assert (mod.argmax(h, w) == 1).all()


@pytest.mark.skipif(kernels.head_kernel() is None, reason="no head kernel can be built or used here")
def test_head_helpers_route_plain_bfloat16_heads_through_the_kernel():
    mod = kernels.head_kernel()
    h, w = case(9, 300, 64, seed=1)
    assert head_kernel(h, w) is mod
    assert head_kernel(h.float(), w.float()) is None
    torch.testing.assert_close(head(Plain(), {"lm_head": w}, h[None]), mod.logits(h, w)[None], rtol=0, atol=0)
    assert torch.equal(greedy_head(Plain(), {"lm_head": w}, h, slice_rows=64), mod.argmax(h, w))
    assert torch.equal(greedy_head(Plain(), {"lm_head": w}, h), mod.argmax(h, w))
