"""tiergen.weights.gguf against the gguf package and transformers' GGUF loader."""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from tiergen.errors import CheckpointError, ModelNotFoundError
from tiergen.weights.source import embedded_model_path
from tiergen.weights.gguf import GGUFFile, dequantize, hf_name, iter_hf_tensors, unpermute_rows


# The embedded model is a hard dependency of the suite: a missing package fails loudly.
SMOLLM = embedded_model_path()


def write_gguf(path: Path, arch: str = "llama", tensors: dict[str, tuple[np.ndarray, QT]] | None = None,
               meta: dict[str, tuple[object, VT]] | None = None) -> Path:
    """A small GGUF written by the gguf package's own writer."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, (value, vtype) in (meta or {}).items():
        w.add_key_value(key, value, vtype)
    for name, (arr, qtype) in (tensors or {}).items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ------------------------------------------------------------ dequantization
def _random_blocks(rng: np.random.Generator, qtype: QT, n_blocks: int,
                   half_cols: tuple[int, ...]) -> np.ndarray:
    """Random block bytes, with the fp16 fields at ``half_cols`` set to sane scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for col in half_cols:
        b[:, col:col + 2] = rng.uniform(-0.05, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return b.reshape(-1)


def _reference(raw: np.ndarray, qtype: QT) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(-1)


@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0])
def test_dequant_matches_gguf_on_quantized_data(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((96, 512)) * 0.3).astype(np.float32)
    data[3] = 0.0  # an all-zero row: d == 0 blocks
    raw = np.ascontiguousarray(gguf.quants.quantize(data, qtype)).view(np.uint8).reshape(-1)
    ref = _reference(raw, qtype)
    ours = dequantize(raw, int(qtype), data.size, torch.float32).numpy()
    np.testing.assert_array_equal(ours, ref)
    ours_bf16 = dequantize(raw, int(qtype), data.size, torch.bfloat16)
    assert torch.equal(ours_bf16, torch.from_numpy(ref).to(torch.bfloat16))


@pytest.mark.parametrize("qtype,half_cols", [
    (QT.Q4_K, (0, 2)), (QT.Q6_K, (208,)), (QT.Q8_0, (0,)), (QT.Q4_0, (0,)), (QT.Q4_1, (0, 2)),
    (QT.Q2_K, (80, 82)),  # not ours: goes through the gguf fallback
])
def test_dequant_matches_gguf_on_random_blocks(qtype: QT, half_cols: tuple[int, ...]) -> None:
    rng = np.random.default_rng(100 + int(qtype))
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = 3000  # several chunks of the chunked decoder, and a ragged last one
    raw = _random_blocks(rng, qtype, n_blocks, half_cols)
    ref = _reference(raw, qtype)
    ours = dequantize(raw, int(qtype), n_blocks * block, torch.float32).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dequant_to_other_dtypes_rounds_like_torch(dtype: torch.dtype) -> None:
    # Ties, overflow, signed zero, subnormals, infinities: our float32 -> dtype
    # store must round exactly as torch's own conversion does.
    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 1e-40, -1e-42, 3.4e38, -3.4e38, np.inf, -np.inf, 65520.0,
                        1.00390625, 1.01171875, -1.00390625, 6e-8, 1e-7], dtype=np.float32)
    data = np.concatenate([special, rng.standard_normal(300_000).astype(np.float32) * 1e3])
    raw = data.view(np.uint8)
    ours = dequantize(raw, int(QT.F32), data.size, dtype)
    assert ours.dtype == dtype
    assert torch.equal(ours, torch.from_numpy(data).to(dtype))


def test_dequant_same_type_is_a_copy() -> None:
    data = np.arange(100, dtype=np.float16)
    raw = data.view(np.uint8)
    ours = dequantize(raw, int(QT.F16), data.size, torch.float16)
    assert torch.equal(ours, torch.from_numpy(data))
    assert not np.shares_memory(ours.numpy(), data)


def test_dequant_accepts_read_only_arrays() -> None:
    data = np.linspace(-1, 1, 64, dtype=np.float32)
    raw = np.ascontiguousarray(gguf.quants.quantize(data, QT.Q8_0)).view(np.uint8).reshape(-1)
    raw.setflags(write=False)
    np.testing.assert_array_equal(dequantize(raw, int(QT.Q8_0), 64).numpy(), _reference(raw, QT.Q8_0))


# ------------------------------------------------------------- round trip
def test_round_trip_tensors_and_metadata(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 40)).astype(np.float32)
    f16 = rng.standard_normal((5, 8, 16)).astype(np.float16)
    q8_src = rng.standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(q8_src, QT.Q8_0)
    meta = {
        "t.u8": (7, VT.UINT8), "t.i8": (-7, VT.INT8), "t.u16": (65535, VT.UINT16),
        "t.i16": (-300, VT.INT16), "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-5, VT.INT32),
        "t.u64": (2**63 + 5, VT.UINT64), "t.i64": (-(2**40), VT.INT64),
        "t.f32": (0.1, VT.FLOAT32), "t.f64": (0.1, VT.FLOAT64),
        "t.bool": (True, VT.BOOL), "t.str": ("héllo ✓", VT.STRING),
        "t.ints": ([1, -2, 3], VT.ARRAY), "t.floats": ([0.5, 1.5], VT.ARRAY),
        "t.strs": (["a", "", "日本"], VT.ARRAY), "t.bools": ([True, False, True], VT.ARRAY),
        "t.nested": ([[1, 2], [3]], VT.ARRAY),
    }
    path = write_gguf(tmp_path / "rt.gguf", tensors={
        "a": (f32, QT.F32), "b": (f16, QT.F16), "c": (q8, QT.Q8_0)}, meta=meta)
    with GGUFFile(path) as f:
        m = f.metadata
        assert m["general.architecture"] == "llama"
        assert (m["t.u8"], m["t.i8"], m["t.u16"], m["t.i16"]) == (7, -7, 65535, -300)
        assert (m["t.u32"], m["t.i32"], m["t.u64"], m["t.i64"]) == (4_000_000_000, -5, 2**63 + 5, -(2**40))
        assert m["t.f32"] == float(np.float32(0.1)) and m["t.f64"] == 0.1
        assert m["t.bool"] is True and m["t.str"] == "héllo ✓"
        assert m["t.ints"] == [1, -2, 3] and m["t.floats"] == [0.5, 1.5]
        assert m["t.strs"] == ["a", "", "日本"] and m["t.bools"] == [True, False, True]
        assert m["t.nested"] == [[1, 2], [3]]

        assert f.version == 3 and list(f.tensors) == ["a", "b", "c"]
        assert f.tensors["a"].shape == (3, 40) and f.tensors["b"].shape == (5, 8, 16)
        assert f.tensors["c"].shape == (4, 64) and f.tensors["c"].type_name == "Q8_0"
        assert f.tensors["c"].nbytes == 4 * 2 * 34
        assert all(i.offset % f.alignment == 0 for i in f.tensors.values())
        assert torch.equal(f.load("a"), torch.from_numpy(f32))
        assert torch.equal(f.load("b", torch.float16), torch.from_numpy(f16))
        assert torch.equal(f.load("b"), torch.from_numpy(f16.astype(np.float32)))
        expect_c = torch.from_numpy(_reference(q8.reshape(-1), QT.Q8_0).reshape(4, 64))
        assert torch.equal(f.load("c"), expect_c)
        assert (f.load("c") - torch.from_numpy(q8_src)).abs().max() < 0.05
        raw = f.raw("c")
        assert raw.dtype == np.uint8 and raw.size == f.tensors["c"].nbytes
        assert np.shares_memory(raw, f.raw("c"))  # a view of the mapping, not a copy
        with pytest.raises(KeyError):
            f.load("missing")


def test_concurrent_loads_agree(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    big = gguf.quants.quantize(rng.standard_normal((64, 32 * 1024)).astype(np.float32), QT.Q4_0)
    path = write_gguf(tmp_path / "big.gguf", tensors={f"t{i}": (big, QT.Q4_0) for i in range(4)})
    with GGUFFile(path) as f:
        expect = f.load("t0", torch.bfloat16)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda n: f.load(n, torch.bfloat16), list(f.tensors) * 2))
    assert all(torch.equal(g, expect) for g in got)


def test_load_returns_fresh_memory(tmp_path: Path) -> None:
    arr = np.arange(64, dtype=np.float32).reshape(2, 32)
    path = write_gguf(tmp_path / "fresh.gguf", tensors={"w": (arr, QT.F32)})
    with GGUFFile(path) as f:
        t = f.load("w")
        t.zero_()
        assert torch.equal(f.load("w"), torch.from_numpy(arr))


# ------------------------------------------------------------------- errors
def _valid_file(tmp_path: Path) -> bytes:
    arr = np.ones((8, 32), dtype=np.float32)
    path = write_gguf(tmp_path / "ok.gguf", tensors={"w": (arr, QT.F32)},
                      meta={"x.s": ("some text", VT.STRING)})
    return path.read_bytes()


def _check_error(path: Path, words: tuple[str, ...]) -> None:
    with pytest.raises(CheckpointError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert any(w in msg for w in words), msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        GGUFFile(tmp_path / "nope.gguf")


def test_wrong_magic(tmp_path: Path) -> None:
    p = tmp_path / "magic.gguf"
    p.write_bytes(b"GGML" + _valid_file(tmp_path)[4:])
    _check_error(p, ("magic",))


def test_not_gguf_at_all(tmp_path: Path) -> None:
    p = tmp_path / "text.gguf"
    p.write_bytes(b"this is a text file, long enough to hold a header\n" * 3)
    _check_error(p, ("magic",))


@pytest.mark.parametrize("keep", [0, 3, 20, 40, 90])
def test_header_cut_short(tmp_path: Path, keep: int) -> None:
    p = tmp_path / "short.gguf"
    p.write_bytes(_valid_file(tmp_path)[:keep])
    _check_error(p, ("truncated", "cut short"))


def test_tensor_data_past_eof(tmp_path: Path) -> None:
    p = tmp_path / "cut.gguf"
    p.write_bytes(_valid_file(tmp_path)[:-100])
    _check_error(p, ("truncated",))


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    data = bytearray(_valid_file(tmp_path))
    data[4:8] = struct.pack("<I", version)
    p = tmp_path / "ver.gguf"
    p.write_bytes(bytes(data))
    _check_error(p, ("version",))


# ------------------------------------------------------- HF names and layout
def _llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (written independently)."""
    rows = w.shape[0]
    out = np.empty_like(w)
    half = rows // n_heads // 2
    for h in range(n_heads):
        for i in range(half):
            out[h * 2 * half + 2 * i] = w[h * 2 * half + i]
            out[h * 2 * half + 2 * i + 1] = w[h * 2 * half + half + i]
    return out


def _tiny_model(tmp_path: Path, arch: str, heads: int = 4, kv: int = 2, head_dim: int = 8,
                hidden: int = 32, bias: bool = False, lm_head: bool = True, extra: dict | None = None):
    rng = np.random.default_rng(1)
    hf = {
        "model.embed_tokens.weight": rng.standard_normal((50, hidden)),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((heads * head_dim, hidden)),
        "model.layers.0.self_attn.k_proj.weight": rng.standard_normal((kv * head_dim, hidden)),
        "model.layers.0.self_attn.v_proj.weight": rng.standard_normal((kv * head_dim, hidden)),
        "model.layers.0.self_attn.o_proj.weight": rng.standard_normal((hidden, heads * head_dim)),
        "model.layers.0.mlp.gate_proj.weight": rng.standard_normal((64, hidden)),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((64, hidden)),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((hidden, 64)),
        "model.layers.0.input_layernorm.weight": rng.standard_normal(hidden),
        "model.layers.0.post_attention_layernorm.weight": rng.standard_normal(hidden),
        "model.norm.weight": rng.standard_normal(hidden),
    }
    if bias:
        for p, n in (("q", heads), ("k", kv), ("v", kv)):
            hf[f"model.layers.0.self_attn.{p}_proj.bias"] = rng.standard_normal(n * head_dim)
    if lm_head:
        hf["lm_head.weight"] = rng.standard_normal((50, hidden))
    hf = {k: v.astype(np.float32) for k, v in hf.items()}
    to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    tensors = {}
    for name, arr in hf.items():
        if name in to_gguf:
            g = to_gguf[name]
        else:
            _, _, layer, *rest = name.split(".")
            part, kind = ".".join(rest[:-1]), rest[-1]
            g = f"blk.{layer}.{parts[part]}.{kind}"
        if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
            arr = _llamacpp_permute(arr, heads if ".attn_q." in g else kv)
        tensors[g] = (arr, QT.F32)
    tensors.update(extra or {})
    meta = {f"{arch}.attention.head_count": (heads, VT.UINT32),
            f"{arch}.attention.head_count_kv": (kv, VT.UINT32)}
    return write_gguf(tmp_path / f"{arch}.gguf", arch, tensors, meta), hf


@pytest.mark.parametrize("arch,bias", [("llama", False), ("llama", True), ("qwen2", True)])
def test_iter_hf_tensors_names_and_unpermute(tmp_path: Path, arch: str, bias: bool) -> None:
    path, hf = _tiny_model(tmp_path, arch, bias=bias)
    with GGUFFile(path) as f:
        ours = dict(iter_hf_tensors(f, torch.float32))
    assert set(ours) == set(hf)
    for name, arr in hf.items():
        assert torch.equal(ours[name], torch.from_numpy(arr)), name


def test_iter_hf_tensors_tied_and_ignored(tmp_path: Path) -> None:
    rope = np.ones(4, dtype=np.float32)
    path, hf = _tiny_model(tmp_path, "llama", lm_head=False, extra={"rope_freqs.weight": (rope, QT.F32)})
    with GGUFFile(path) as f:
        names = [n for n, _ in iter_hf_tensors(f, torch.bfloat16)]
    assert "lm_head.weight" not in names and set(names) == set(hf)


def test_iter_hf_tensors_rejects_unknown(tmp_path: Path) -> None:
    odd = np.ones(4, dtype=np.float32)
    path, _ = _tiny_model(tmp_path, "llama", extra={"blk.0.attn_sinks.weight": (odd, QT.F32)})
    with GGUFFile(path) as f, pytest.raises(CheckpointError, match="attn_sinks"):
        list(iter_hf_tensors(f))


def test_unpermute_inverts_llamacpp_permute() -> None:
    w = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        back = unpermute_rows(torch.from_numpy(_llamacpp_permute(w, heads)), heads)
        assert torch.equal(back, torch.from_numpy(w))


def test_hf_name() -> None:
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("blk.0.attn_v.bias") == "model.layers.0.self_attn.v_proj.bias"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None and hf_name("blk.0.nonsense.weight") is None


# ------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smol() -> GGUFFile:
    with GGUFFile(SMOLLM) as f:
        yield f


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(SMOLLM)


def test_smollm_metadata_equals_gguf_reader(smol: GGUFFile, smol_reader: gguf.GGUFReader) -> None:
    fields = {k: v for k, v in smol_reader.fields.items() if not k.startswith("GGUF.")}
    assert set(smol.metadata) == set(fields)
    for key, field in fields.items():
        ref = field.contents()
        assert smol.metadata[key] == ref, key
        assert type(smol.metadata[key]) is type(ref), key
    tokens = smol.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert smol.metadata["tokenizer.ggml.merges"] == fields["tokenizer.ggml.merges"].contents()
    assert smol.metadata["llama.attention.head_count"] == 9


def test_smollm_tensor_index_equals_gguf_reader(smol: GGUFFile, smol_reader: gguf.GGUFReader) -> None:
    assert list(smol.tensors) == [t.name for t in smol_reader.tensors]
    for t in smol_reader.tensors:
        info = smol.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.ggml_type == int(t.tensor_type)
        assert info.shape == tuple(int(d) for d in reversed(t.shape))


@pytest.fixture(scope="module")
def hf_state_dict(hf_smollm) -> dict[str, torch.Tensor]:
    """What transformers makes of the same file."""
    return {k: v.detach() for k, v in hf_smollm.state_dict().items()}


def test_smollm_tensors_equal_transformers(smol: GGUFFile, hf_state_dict: dict[str, torch.Tensor]) -> None:
    seen = set()
    for name, t in iter_hf_tensors(smol, torch.float32):
        ref = hf_state_dict[name]
        assert t.dtype == torch.float32 and t.shape == ref.shape, name
        assert torch.equal(t, ref), name
        seen.add(name)
    # SmolLM2 ties lm_head to the embedding: the file has no output.weight.
    assert set(hf_state_dict) - seen == {"lm_head.weight"}
    assert len(seen) == 2 + 30 * 9  # embed, final norm, 9 per layer


def test_smollm_bfloat16_equals_rounded_float32(smol: GGUFFile, hf_state_dict: dict[str, torch.Tensor]) -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.0.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"]
    got = {n: t for n, t in iter_hf_tensors(smol, torch.bfloat16) if n in names}
    for n in names:
        assert got[n].dtype == torch.bfloat16
        assert torch.equal(got[n], hf_state_dict[n].to(torch.bfloat16)), n
