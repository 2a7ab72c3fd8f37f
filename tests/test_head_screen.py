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


def extremes():
    """Finite bfloat16 features and weights where the relative bound fails: (a) an estimate's
    int8 sum times the weight's step overflows float32 though the logit does not, (b) a weight row
    of subnormals, which vdpbf16ps reads as zeros in the exact sums (and its estimate does not),
    (c) a feature row of subnormals beside a near-subnormal channel."""
    K, V, N = 64, 32, 17
    h = torch.full((N, K), 2.0 ** -100)
    h[:, :8] = 1.0                     # the outlier channels
    w = torch.zeros(V, K)
    w[0, 8:] = 2.0 ** 121              # logit 56 * 2^21, but 127 * 56 * 2^121 on the way
    w[1, :8] = 2.0 ** 40               # the winner, 8 * 2^40, from the outliers alone
    yield "overflow", h, w
    h = torch.full((N, K), 2.0 ** 90)
    h[:, :32] = 2.0 ** 100
    w = torch.zeros(V, K)
    w[0, :32] = 1.1e-38                # subnormal: logit 0 in the exact sums
    w[1, 32:] = 2.0 ** -126            # the winner, 2^-31
    yield "subnormal weight", h, w
    g = torch.Generator().manual_seed(0)
    K, V = 64, 64
    w = torch.randn(V, K, generator=g) * 0.1
    w[:, 3] = 100 * torch.randn(V, generator=g)
    w[:, 4] = 1 + torch.rand(V, generator=g)
    h = torch.randn(N, K, generator=g)
    h[:, 3:5] *= 0.01
    h[0] = 0
    h[0, 3], h[0, 4] = 1.1e-38, 1.2e-38   # dim 3 subnormal (read as 0), dim 4 the least normal
    yield "subnormal features", h, w


@pytest.mark.parametrize("name", ["overflow", "subnormal weight", "subnormal features"])
def test_not_for_magnitudes_outside_the_bound(mods, monkeypatch, name):
    # the plain kernel's ids, never the screen's, where the bound does not hold
    mod, plain = mods
    monkeypatch.setattr(kernels, "first_of", lambda names: "lm_head_avx512")
    h, w = next((h, w) for n, h, w in extremes() if n == name)
    h, w = h.bfloat16(), w.bfloat16()
    screen.allow(w, tier())
    ids = screen.greedy(h, w)
    assert ids is None or torch.equal(ids, plain.argmax(h, w))
    assert torch.equal(greedy_head(Plain(), {"lm_head": w}, h), plain.argmax(h, w))
    assert not screen.Screen.make(w, h).serves(h)


def test_served_for_ordinary_magnitudes(mods):
    h, w = case(32, 400, 64, seed=9)
    s = screen.Screen.make(w, h)
    assert s.serves(h) and s.serves(h * 1e6) and s.serves(h * 1e-6)
    h[3] = 0
    assert s.serves(h)                                  # a zero row: every logit exactly 0
    h[4, 5] = 1e-39
    assert not s.serves(h)
    h[4, 5] = float("inf")
    assert not s.serves(h)


def test_exact_ties_between_different_rows(mods):
    # small integers: every logit exact, many equal among rows whose int8 estimates differ
    mod, plain = mods
    g = torch.Generator().manual_seed(10)
    for K, V, N in [(16, 300, 17), (33, 1000, 40), (64, 2000, 64), (100, 4099, 25)]:
        w = torch.randint(-3, 4, (V, K + K % 2), generator=g).bfloat16()[:, :K]
        h = torch.randint(-3, 4, (N, K + K % 2), generator=g).bfloat16()[:, :K]
        w[V // 2:V // 2 + 50] = w[:50]                  # and equal rows
        assert torch.equal(screened(mod, h, w)[0], plain.argmax(h, w))


def test_near_duplicate_rows_one_ulp_apart(mods):
    # rows one bfloat16 step apart in a dim or two, features aligned with them: the logits within
    # a few float32 steps, the true best often not the best estimate
    mod, plain = mods
    g = torch.Generator().manual_seed(11)
    for K in (63, 64, 130):
        base = torch.randn(K, generator=g).bfloat16()
        w = base.repeat(600, 1).view(torch.int16)
        m = torch.rand(600, K, generator=g) < 2 / K
        w = torch.where(m, w + torch.randint(-1, 2, (600, K), generator=g, dtype=torch.int16), w).view(torch.bfloat16)
        w = torch.cat([torch.randn(50, K, generator=g).bfloat16() * 0.1, w])
        w = torch.zeros(650, K + K % 2, dtype=torch.bfloat16).copy_(torch.nn.functional.pad(w, (0, K % 2)))[:, :K]
        h = (base.float() * 3 + 0.001 * torch.randn(40, K, generator=g)).bfloat16()
        h = torch.nn.functional.pad(h, (0, K % 2))[:, :K]
        assert torch.equal(screened(mod, h, w)[0], plain.argmax(h, w))


def tie_model(hf_model_dirs, tmp_path):
    """llama_gqa (untied head) with head rows 128.. equal to rows 0.. (exact ties, the lower id to
    win) and rows 64..127 one bfloat16 step from rows 0..63 in a few dims (near ties)."""
    from safetensors.torch import load_file, save_file
    import shutil
    _, path = hf_model_dirs("llama_gqa")
    out = tmp_path / "ties"
    shutil.copytree(path, out)
    f = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    t = load_file(str(f))
    w = t["lm_head.weight"].bfloat16()
    bits = w[:64].clone().view(torch.int16)
    bits[:, ::16] += 1
    w[64:128] = bits.view(torch.bfloat16)
    w[128:] = w[:128]
    t["lm_head.weight"] = w.float()
    save_file(t, str(f), metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen3", "opt", "ties"])
def test_llm_greedy_same_tokens_with_and_without_the_screen(mods, monkeypatch, hf_model_dirs, tmp_path, name):
    # the public API on small random models in bfloat16: 24 sequences a step (past the few-rows
    # batch), greedy, the same tokens as the plain head's
    from tiergen import LLM, SamplingParams
    if kernels.first_of(kernels.HEAD_KERNELS) != "lm_head_avx512":
        pytest.skip("this CPU's head kernel is not the AVX-512 one")
    monkeypatch.setattr(screen, "MAX_CANDIDATE_SHARE", 1.0)   # kept on however many candidates
    path = tie_model(hf_model_dirs, tmp_path) if name == "ties" else hf_model_dirs(name)[1]
    g = torch.Generator().manual_seed(12)
    prompts = [torch.randint(3, 250, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(24)]
    params = SamplingParams(max_new_tokens=6)
    served = []
    orig = screen.greedy
    monkeypatch.setattr(screen, "greedy", lambda h, w: served.append(orig(h, w)) or served[-1])
    llm = LLM(path, dtype="bfloat16")
    a = [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)]
    assert any(ids is not None for ids in served)       # the screen chose the tokens
    monkeypatch.setattr(screen, "greedy", lambda h, w: None)
    assert [o.token_ids for o in llm.generate(prompt_token_ids=prompts, params=params)] == a
    if name == "ties":
        assert all(t < 128 for ts in a for t in ts)     # an exact tie goes to the lower id
