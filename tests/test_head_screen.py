"""The greedy head screened in int8 (kernels/head_screen.cpp, weights/screen.py): the same ids as
the AVX-512 head kernel's argmax on every shape, including ties, near ties and features with large
outlier channels; when the screen is made, charged, kept, given back and passed over."""
import pytest
import torch

from tiergen import kernels
from tiergen.models.base import greedy_head
from tiergen.weights import screen

from checks import built_kernel


@pytest.fixture
def mods():
    mod = built_kernel("head_screen", "AVX-512 VNNI and BF16")
    return mod, built_kernel("lm_head_avx512", "AVX-512 BF16")


def case(N, V, K, seed, outliers=(3, 17)):
    """Features with a few channels 20-40x the rest (as final hidden states have) and a weight
    with heavy-tailed rows, both strided."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, K + 4, generator=g)[:, 1:K + 1]
    for i, c in enumerate(outliers):
        if c < K:
            h[:, c] *= 20 + 20 * i
    w = torch.randn(V, K + 2, generator=g)[:, :K] * torch.rand(V, 1, generator=g) * 0.1
    w[:, : K // 8] *= 4
    return h.bfloat16(), w.bfloat16()


def screened(mod, h, w):
    return screen.Screen.make(w, h).argmax(mod, h, w)


@pytest.mark.parametrize("N,V,K", [(17, 100, 64), (40, 1000, 64), (256, 4099, 576), (33, 777, 34),
                                   (64, 5000, 576), (19, 61, 4), (100, 300, 160)])
def test_same_ids_as_the_head_kernel(mods, N, V, K):
    mod, plain = mods
    h, w = case(N, V, K, seed=N + V + K)
    ids, candidates = screened(mod, h, w)
    assert ids.dtype == torch.long and ids.shape == (N,)
    assert torch.equal(ids, plain.argmax(h, w))
    assert torch.equal(ids, plain.logits(h, w).argmax(-1))
    assert N <= candidates <= N * V


def test_odd_dims_read_alone(mods):
    # K = 33 in rows of stride 34 (an even stride): the last dim has no partner
    mod, plain = mods
    g = torch.Generator().manual_seed(5)
    w = torch.randn(500, 34, generator=g).bfloat16()[:, :33]
    h = torch.randn(24, 34, generator=g).bfloat16()[:, :33]
    h[:, 32] *= 50                     # the odd dim decides many rows
    assert torch.equal(screened(mod, h, w)[0], plain.argmax(h, w))


def test_ties_go_to_the_lowest_id(mods):
    mod, plain = mods
    h, w = case(32, 999, 64, seed=1)
    w[40] *= 8
    w[997] *= 8
    w[900] = w[40]                     # exact ties across the vocabulary
    w[998] = w[997]                    # and at its end
    h[:8] = w[40] * 6                  # rows whose best is the tied pair
    h[8:16] = w[997] * 6
    ids = screened(mod, h, w)[0]
    assert torch.equal(ids, plain.argmax(h, w))
    assert (ids[:8] == 40).all() and (ids[8:16] == 997).all()


def test_near_ties_below_the_int8_step(mods):
    # ids whose logits differ by a bfloat16 step of one weight entry: far inside the estimate's
    # error, so only the exact sums can tell them apart
    mod, plain = mods
    h, w = case(48, 256, 64, seed=2)
    base = w[10].clone()
    for i in range(100, 164):
        w[i] = base
        w[i, i % 64] = (base[i % 64].float() * (1 + 2.0 ** -7 * (1 + i % 3))).bfloat16()
    h[:] = (base.float() * 4 + 0.01 * h.float()).bfloat16()
    assert torch.equal(screened(mod, h, w)[0], plain.argmax(h, w))


def test_zero_and_constant_rows(mods):
    # a zero row ties every id (its bound is zero: every id a candidate), as does a zero weight
    mod, plain = mods
    h, w = case(20, 300, 64, seed=3)
    h[0] = 0
    w[:5] = 0
    h[1] = -w[7] * 100                 # a row every logit but the zero ids' is against
    ids, candidates = screened(mod, h, w)
    assert torch.equal(ids, plain.argmax(h, w)) and ids[0] == 0
    assert candidates >= 300


def test_real_text_screens_out_nearly_every_id(mods, smollm_path):
    # the embedded model's head on its own final features: few candidates, the same ids
    from tiergen import LLM, SamplingParams
    mod, plain = mods
    llm = LLM(str(smollm_path))
    seen = []
    orig = screen.greedy

    def spy(h, w):
        seen.append((h.clone(), w))
        return orig(h, w)

    screen.greedy = spy
    try:
        prompts = [f"Question {i}: what is {i} times {i + 3}? Answer:" for i in range(12)]
        prompts += [f"The {w} is the largest" for w in ("river", "city", "planet", "ocean", "desert", "island",
                                                      "country", "lake", "forest", "mountain", "bridge", "tower")]
        llm.generate(prompts, SamplingParams(max_new_tokens=3))
    finally:
        screen.greedy = orig
    h, w = seen[-1]
    ids, candidates = screened(mod, h, w)
    assert torch.equal(ids, plain.argmax(h, w))
    assert candidates <= 64 * h.shape[0]


def tier(budget=1 << 30):
    from tiergen.tiers import Tier
    return Tier("cpu", budget)


def test_made_for_an_allowed_weight_and_charged_to_its_tier(mods, monkeypatch):
    mod, plain = mods
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head_avx512")
    h, w = case(32, 400, 64, seed=4)
    assert screen.greedy(h, w) is None                  # not allowed (a streamed head is never)
    t = tier()
    screen.allow(w, t)
    assert torch.equal(screen.greedy(h, w), plain.argmax(h, w))
    made = screen._allowed[id(w)].screen
    assert made is not None and t.current == made.nbytes == screen.codes_bytes(400, 64) and screen.holding([t])
    assert made.nbytes == sum(x.numel() * x.element_size() for x in (made.rest, made.outliers, made.wq, made.wo, made.ids))
    assert torch.equal(screen.greedy(h * 2, w), plain.argmax(h * 2, w))
    assert screen._allowed[id(w)].screen is made and t.current == made.nbytes       # kept, charged once
    other = tier()
    screen.release([other])                             # another engine's tiers: kept
    assert t.current == made.nbytes and screen.holding([t]) and not screen.holding([other])
    screen.release([t])                                 # a pass that does not fit otherwise: codes go
    assert t.current == 0 and not screen.holding([t])
    assert torch.equal(screen.greedy(h, w), plain.argmax(h, w)) and t.current == made.nbytes   # made again
    assert screen.greedy(h[:16], w) is None             # a batch the plain kernel sums otherwise
    bad = h.clone()
    bad[3, 5] = float("nan")
    assert screen.greedy(bad, w) is None                # not all finite: the plain kernel's rules
    w.mul_(-1)                                          # changed in place: stale codes, given back
    assert screen.greedy(h, w) is None and t.current == 0


def test_not_made_where_its_codes_do_not_fit(mods, monkeypatch):
    mod, plain = mods
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head_avx512")
    h, w = case(32, 400, 64, seed=5)
    t = tier(screen.codes_bytes(400, 64) - 1)
    screen.allow(w, t)
    assert screen.greedy(h, w) is None and t.current == 0
    t.budget += 1                                       # room now: made at the next call
    assert torch.equal(screen.greedy(h, w), plain.argmax(h, w)) and t.current == t.budget


def test_switched_off_when_it_does_not_pay(mods, monkeypatch):
    mod, plain = mods
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head_avx512")
    h, w = case(32, 400, 64, seed=6)
    h = torch.zeros_like(h)                             # every id a candidate of every row
    t = tier()
    screen.allow(w, t)
    for _ in range(screen.STRIKES):
        assert torch.equal(screen.greedy(h, w), plain.argmax(h, w))
    assert screen.greedy(h, w) is None and t.current == 0


def test_not_for_a_head_the_screen_does_not_reproduce(mods, monkeypatch):
    h, w = case(32, 400, 64, seed=7)
    screen.allow(w, tier())
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head")   # AMX: other sums
    assert screen.greedy(h, w) is None
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head_avx512")
    monkeypatch.setattr(screen, "MAX_CODES_BYTES", 400 * 64 - 1)
    assert screen.greedy(h, w) is None


def test_the_engine_allows_its_resident_head_only(mods, smollm_path, tmp_path):
    from tiergen import LLM, Policy, SamplingParams
    if kernels.first_of(kernels.HEAD_KERNELS) != "lm_head_avx512":
        pytest.skip("this CPU's head kernel is not the AVX-512 one")
    prompts = [f"Item {i}: the best" for i in range(24)]
    llm = LLM(str(smollm_path))
    head = llm.engine.weights.group("head")["lm_head"]
    assert screen._allowed[id(head)].ref() is head
    before = llm.memory_report()["tiers"]["gpu"]["current"]
    a = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=3))]
    made = screen._allowed[id(head)].screen
    assert made is not None and llm.memory_report()["tiers"]["gpu"]["current"] - before >= made.nbytes
    screen.release([llm.tiers[t] for t in ("gpu", "cpu", "disk")])
    live = lambda: {k for k, e in screen._allowed.items() if e.ref() is not None}   # noqa: E731
    allowed = live()
    offloaded = LLM(str(smollm_path), policy=Policy.from_percent([0, 0, 100, 0, 100, 0]), offload_dir=str(tmp_path))
    assert offloaded.engine.weights.homes["head"]["lm_head"].tier == "disk"
    assert live() == allowed                             # on disk: streamed, never screened
    assert [o.token_ids for o in offloaded.generate(prompts, SamplingParams(max_new_tokens=3))] == a


class Plain:
    def head_features(self, w, x):
        return x


def test_greedy_head_takes_the_screen(mods, monkeypatch):
    mod, plain = mods
    if kernels.head_kernel() is not plain:
        pytest.skip("this CPU's head kernel is not the AVX-512 one")
    h, w = case(64, 2000, 96, seed=8)
    screen.allow(w, tier())
    calls = []
    real = screen.Screen.argmax
    monkeypatch.setattr(screen.Screen, "argmax", lambda self, *a: calls.append(1) or real(self, *a))
    for _ in range(3):
        assert torch.equal(greedy_head(Plain(), {"lm_head": w}, h), plain.argmax(h, w))
    assert len(calls) == 3
