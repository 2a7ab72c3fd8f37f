"""Group-wise quantization: error bounds, exact cases, packing, sizes, storage round trips."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from tiergen.quant import (WEIGHT_QUANT, KVQuantConfig, QTensor, QuantConfig, dequantize, hadamard,
                           layout, pack, packed_size, quantize, quantized_nbytes, unpack)

SHAPES = [(7, 13), (1, 1), (3, 65), (130, 3)]


def per_element(t: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Broadcast a per-group tensor [*outer, G] back to the input's shape."""
    gd = q.cfg.group_dim % len(q.shape)
    n = q.shape[gd]
    full = t.double().repeat_interleave(q.cfg.group_size, -1)[..., :n]
    return full.movedim(-1, gd)


def check_half_step(x: torch.Tensor, q: QTensor) -> None:
    xd = x.double()
    y = dequantize(q, torch.float32).double()
    step = per_element(q.scales, q)
    lo = per_element(q.mins, q)
    err = (y - xd).abs()
    # float32 arithmetic in (de)quantization: a few ulps of the magnitudes involved
    tol = 4 * torch.finfo(torch.float32).eps * (xd.abs() + lo.abs() + step * q.cfg.levels) + 1e-30
    assert torch.all(err <= step / 2 + tol), float((err - step / 2 - tol).max())


@pytest.mark.parametrize("shape,gd", list(itertools.product(SHAPES, (0, -1))))
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("g", [1, 3, 64, 128])
def test_error_at_most_half_step(shape: tuple[int, int], gd: int, bits: int, g: int) -> None:
    gen = torch.Generator().manual_seed(hash((shape, gd, bits, g)) % 2**31)
    x = torch.randn(shape, generator=gen) * 3 + 0.5
    q = quantize(x, QuantConfig(bits=bits, group_size=g, group_dim=gd))
    check_half_step(x, q)
    # The step is the group's own range / levels, so the bound is not vacuous.
    xg = x.movedim(gd, -1)
    n = xg.shape[-1]
    groups = -(-n // g)
    pad = torch.cat([xg, xg[..., -1:].expand(*xg.shape[:-1], groups * g - n)], -1).reshape(*xg.shape[:-1], groups, g)
    want = (pad.amax(-1) - pad.amin(-1)) / q.cfg.levels
    assert torch.allclose(q.scales, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sd", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_half_step_with_16_bit_scales(sd: torch.dtype, bits: int) -> None:
    # Stored mins round down and scales round up, so the bound holds for what is stored,
    # even for narrow groups far from zero (where a rounded-up min would clip values).
    x = torch.cat([torch.randn(64, 96), 1000 + 1e-3 * torch.rand(8, 96)])
    q = quantize(x, QuantConfig(bits=bits, group_size=32, scale_dtype=sd))
    assert q.mins.dtype == sd and q.scales.dtype == sd
    check_half_step(x, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x = (torch.randn(33, 100) * 4).to(dtype)
    q = quantize(x, QuantConfig(bits=4, group_size=64))
    assert q.mins.dtype == dtype          # default: scales in the input's dtype
    check_half_step(x, q)
    y = dequantize(q)
    assert y.dtype == dtype and y.shape == x.shape
    assert dequantize(q, torch.float32).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_groups_exact(dtype: torch.dtype, bits: int) -> None:
    vals = torch.tensor([0.1, -3.7, 0.0, 1e-3, 12345.0, -0.0])
    x = vals[:, None].expand(6, 70).to(dtype).clone()      # 70: a full group and a padded one
    x[0, :5] = torch.arange(5, dtype=dtype)              # a non-constant group beside them
    q = quantize(x, QuantConfig(bits=bits, group_size=64))
    assert torch.all(q.scales[1:] == 0)
    y = dequantize(q)
    assert not torch.isnan(y).any()
    assert torch.equal(y[1:], x[1:])
    assert torch.equal(y[0, 64:], x[0, 64:])


def test_all_zero_and_scalar() -> None:
    z = torch.zeros(4, 128)
    assert torch.equal(dequantize(quantize(z)), z)
    s = torch.tensor(2.5)
    y = dequantize(quantize(s))
    assert y.shape == () and float(y) == 2.5


def test_padding_does_not_change_real_groups() -> None:
    x = torch.randn(5, 65)
    q = quantize(x, QuantConfig(group_size=64))
    last = x[:, 64:]
    assert torch.equal(q.mins[:, 1], last[:, 0]) and torch.all(q.scales[:, 1] == 0)


def test_middle_group_dim() -> None:
    x = torch.randn(2, 70, 3)
    q = quantize(x, QuantConfig(bits=5, group_size=16, group_dim=1))
    assert q.data.shape == (2, 3, 5, packed_size(16, 5))
    check_half_step(x, q)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 65])
def test_pack_unpack_round_trip(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, 4, n), dtype=torch.uint8)
    p = pack(codes, bits)
    assert p.dtype == torch.uint8 and p.shape == (3, 4, packed_size(n, bits))
    assert torch.equal(unpack(p, bits, n), codes)


def test_packed_sizes() -> None:
    assert [packed_size(64, b) for b in range(1, 9)] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert packed_size(3, 4) == 2 and packed_size(3, 3) == 3 and packed_size(9, 5) == 10


def test_nibble_order() -> None:
    # Documented layout: the first code in the low bits.
    assert pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # longer groups are packed in planes: byte j holds codes j and j + n/2
    assert pack(torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8), 4).tolist() == [[0x31, 0x42]]
    assert pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).tolist() == [[0x31, 0x02]]


def test_nbytes_4_bit_fp16() -> None:
    x = torch.randn(128, 256, dtype=torch.float16)
    q = quantize(x, QuantConfig(bits=4, group_size=64))
    # 0.5 byte per value + a 2-byte min and a 2-byte scale per 64 values
    want = 128 * 256 // 2 + 128 * (256 // 64) * 2 * 2
    assert q.nbytes == want == quantized_nbytes(x.shape, x.dtype, q.cfg)
    assert q.nbytes / (x.numel() * 2) == pytest.approx(0.28125)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape,gd", [((7, 13), 0), ((3, 65), -1), ((2, 3, 50, 64), -1), ((2, 3, 50, 64), 2)])
def test_nbytes_matches_layout(bits: int, shape: tuple[int, ...], gd: int) -> None:
    cfg = QuantConfig(bits=bits, group_size=32, group_dim=gd)
    q = quantize(torch.randn(shape, dtype=torch.bfloat16), cfg)
    lay = layout(shape, torch.bfloat16, cfg)
    for name, t in q.tensors().items():
        assert (tuple(t.shape), t.dtype) == lay[name]
    assert q.nbytes == quantized_nbytes(shape, torch.bfloat16, cfg)


@pytest.mark.parametrize("cfg", [QuantConfig(), QuantConfig(bits=3, group_size=5, group_dim=0),
                                 QuantConfig(bits=8, scale_dtype=torch.float16), QuantConfig(rotate=True)])
def test_tensors_meta_round_trip(cfg: QuantConfig) -> None:
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    q = quantize(x, cfg)
    meta = json.loads(json.dumps(q.meta()))      # metadata survives JSON
    r = QTensor.from_tensors(q.tensors(), meta)
    assert r.cfg == cfg and r.shape == q.shape and r.dtype == q.dtype
    assert torch.equal(dequantize(r), dequantize(q))
    # as raw bytes, e.g. read back from a file
    raw = {k: t.contiguous().view(torch.uint8).flatten().clone() for k, t in q.tensors().items()}
    r = QTensor.from_tensors(raw, meta)
    assert torch.equal(dequantize(r), dequantize(q))
    assert torch.equal(dequantize(q.to("cpu")), dequantize(q))
    with pytest.raises(ValueError):
        QTensor.from_tensors({**raw, "data": raw["data"][:-1]}, meta)


def test_sliceable_along_outer_dims() -> None:
    # A cache quantized per token can be written one token at a time.
    k = torch.randn(2, 3, 10, 64)
    cfg = QuantConfig(group_size=64)
    whole = quantize(k, cfg)
    for t in range(10):
        one = quantize(k[:, :, t:t + 1], cfg)
        assert torch.equal(one.data[:, :, 0], whole.data[:, :, t])
        assert torch.equal(one.scales[:, :, 0], whole.scales[:, :, t])


def test_validation() -> None:
    for bad in (dict(bits=1), dict(bits=9), dict(group_size=0), dict(scale_dtype=torch.float64)):
        with pytest.raises(ValueError):
            QuantConfig(**bad)
    with pytest.raises(TypeError):
        quantize(torch.arange(4), QuantConfig())
    with pytest.raises(ValueError):
        quantize(torch.randn(4, 4), QuantConfig(group_dim=2))


def test_hadamard_orthonormal() -> None:
    x, y = torch.randn(5, 3, 64), torch.randn(5, 3, 64)
    hx, hy = hadamard(x), hadamard(y)
    assert torch.allclose(hadamard(hx), x, atol=1e-5)
    assert torch.allclose((hx * hy).sum(-1), (x * y).sum(-1), atol=1e-4)
    assert torch.allclose(hadamard(x.transpose(1, 2), 1).transpose(1, 2), hx, atol=1e-6)
    with pytest.raises(ValueError):
        hadamard(torch.randn(3, 48))


def test_rotated_quantization_error() -> None:
    # With an outlier channel, rotating first spreads it and lowers the error.
    x = torch.randn(256, 64)
    x[:, 5] *= 30
    plain = dequantize(quantize(x, QuantConfig(bits=4)))
    rot = dequantize(quantize(x, QuantConfig(bits=4, rotate=True)))
    assert (rot - x).norm() < (plain - x).norm()


def test_kv_config() -> None:
    kv = KVQuantConfig()
    assert kv.key(token_dim=2) == QuantConfig(4, 64, 2) and kv.value() == QuantConfig(4, 64, -1)
    assert kv.unquantized_keys(130) == 2
    per_token = KVQuantConfig(bits=8, per_channel_keys=False)
    assert per_token.key(token_dim=0) == QuantConfig(8, 64, -1) and per_token.unquantized_keys(130) == 0
    with pytest.raises(ValueError):
        KVQuantConfig(bits=9)


def test_per_channel_keys_blockwise() -> None:
    # Per-channel keys: each full block of group_size tokens is quantized on its own,
    # and blocks concatenate along the group axis into the whole cache.
    kv = KVQuantConfig(group_size=16)
    k = torch.randn(2, 3, 48, 64)           # [batch, kv_heads, tokens, head_dim]
    cfg = kv.key(token_dim=2)
    whole = quantize(k, cfg)
    blocks = [quantize(k[:, :, i:i + 16], cfg) for i in range(0, 48, 16)]
    assert torch.equal(torch.cat([b.data for b in blocks], -2), whole.data)
    assert torch.equal(torch.cat([b.mins for b in blocks], -1), whole.mins)
    check_half_step(k, whole)


def test_weight_default_reproduces_q4_1_blocks() -> None:
    # A Q4_1 GGUF block is 32 values d * q + m, q in 0..15, along the input dim;
    # the default weight config finds the same grid, so requantizing is lossless.
    d, m = torch.rand(8, 4, 1) + 0.1, torch.randn(8, 4, 1)
    q = torch.randint(0, 16, (8, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(8, 128)
    assert torch.allclose(dequantize(quantize(w, WEIGHT_QUANT)), w, atol=1e-5)


@pytest.mark.parametrize("shape,group_dim", [((37, 100), -1), ((300, 64), -1), ((5, 7, 33), -1), ((64, 40), 0)])
@pytest.mark.parametrize("bits", [4, 3, 8])
def test_dequantize_into_matches_dequantize(shape, group_dim, bits):
    from tiergen.quant import dequantize_into
    x = torch.randn(shape)
    q = quantize(x, QuantConfig(bits=bits, group_size=32, group_dim=group_dim))
    out = torch.full(shape, float("nan"))
    got = dequantize_into(q, out, chunk_bytes=1024)   # many small row chunks
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize(q, torch.float32))
