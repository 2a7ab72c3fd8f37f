"""Write a random-weight OPT model (facebook/opt-1.3b's shape by default) as a
Hugging Face dir: config.json + one bf16 model.safetensors.

The safetensors file is written tensor by tensor (header first, then each
tensor's bytes as soon as it is drawn), so RAM use stays at one tensor (the
largest is the 50272 x 2048 embedding, ~0.4 GB while drawn in fp32) instead of
the whole 2.6 GB model. Every tensor has its own generator seeded from
(seed, tensor index), so the file is the same bit for bit on every run.

    python benchmarks/make_random_opt.py /tmp/tiergen-bench/opt-1.3b-random
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import torch

MARKER = "tiergen_random.json"   # what was generated, to skip a second run

# facebook/opt-1.3b's shape
OPT_1_3B: dict[str, object] = dict(
    vocab_size=50272, hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
    ffn_dim=8192, max_position_embeddings=2048, word_embed_proj_dim=2048,
    do_layer_norm_before=True, activation_function="relu", enable_bias=True,
    layer_norm_elementwise_affine=True, tie_word_embeddings=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=2,
)

# tiny shape for --quick smoke tests
OPT_TINY: dict[str, object] = dict(OPT_1_3B, hidden_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, ffn_dim=1024, word_embed_proj_dim=256,
                                   max_position_embeddings=512)


def tensor_specs(shape: dict[str, object]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, in the order transformers lists
    them, from a model built on the meta device (no memory used)."""
    from transformers import OPTConfig, OPTForCausalLM
    cfg = OPTConfig(**shape)
    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied to the token embedding; not stored
        specs.append((name, tuple(t.shape)))
    return specs


def init_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, std: float) -> torch.Tensor:
    """Layer norms at identity, biases small, matrices N(0, std)."""
    if "layer_norm" in name:
        base = torch.ones if name.endswith(".weight") else torch.zeros
        return base(shape, dtype=torch.bfloat16)
    scale = std if len(shape) > 1 else std / 4
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * scale).to(torch.bfloat16)


def write_safetensors_streaming(path: Path, specs: list[tuple[str, tuple[int, ...]]],
                                seed: int, std: float) -> int:
    """Write a safetensors file drawing one tensor at a time; returns its size."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "generator": "tiergen random",
                                                  "seed": str(seed)}}
    off = 0
    for name, shape in specs:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad the header so the data starts 8-aligned
    tmp = path.with_suffix(".safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for i, (name, shape) in enumerate(specs):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
            t = init_tensor(name, shape, gen, std).contiguous()
            f.write(memoryview(t.view(torch.int16).numpy()).cast("B"))
            del t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(raw) + off


def expected_marker(shape: dict[str, object], seed: int, std: float) -> dict[str, object]:
    return {"shape": shape, "seed": seed, "std": std, "dtype": "bfloat16"}


def is_complete(out: Path, marker: dict[str, object]) -> bool:
    try:
        have = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return False
    st = out / "model.safetensors"
    return (have.get("params") == marker and (out / "config.json").is_file() and st.is_file()
            and st.stat().st_size == have.get("bytes"))


def make(out: Path, shape: dict[str, object] = OPT_1_3B, seed: int = 0, std: float = 0.02,
         force: bool = False) -> dict[str, object]:
    """Create the model dir unless it is already there with the same parameters."""
    from transformers import OPTConfig
    marker = expected_marker(shape, seed, std)
    if not force and is_complete(out, marker):
        return {"path": str(out), "skipped": True, **json.loads((out / MARKER).read_text())}
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).unlink(missing_ok=True)
    t0 = time.perf_counter()
    cfg = OPTConfig(**shape)
    cfg.dtype = torch.bfloat16  # saved as "dtype" in config.json
    cfg.save_pretrained(out)
    specs = tensor_specs(shape)
    nbytes = write_safetensors_streaming(out / "model.safetensors", specs, seed, std)
    nparams = sum(_numel(s) for _, s in specs)
    info = {"params": marker, "bytes": nbytes, "num_params": nparams, "num_tensors": len(specs),
            "seconds": round(time.perf_counter() - t0, 1)}
    (out / MARKER).write_text(json.dumps(info, indent=1))
    return {"path": str(out), "skipped": False, **info}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def verify(out: Path) -> dict[str, object]:
    """Header matches the meta model's tensors, and a few tensors read back."""
    from safetensors import safe_open
    cfg = json.loads((out / "config.json").read_text())
    shape = {k: cfg[k] for k in OPT_1_3B if k in cfg}
    specs = dict(tensor_specs(shape))
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(specs), f"tensor names differ: {sorted(keys ^ set(specs))[:5]}"
        for name in (next(iter(specs)), "model.decoder.final_layer_norm.weight"):
            t = f.get_tensor(name)
            assert tuple(t.shape) == specs[name] and t.dtype == torch.bfloat16, name
            assert torch.isfinite(t.float()).all(), name
    return {"verified": True, "tensors": len(keys)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="/tmp/tiergen-bench/opt-1.3b-random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--tiny", action="store_true", help="a 4-layer, 256-wide model for smoke tests")
    ap.add_argument("--force", action="store_true", help="rewrite even if it is already there")
    a = ap.parse_args(argv)
    info = make(Path(a.out), OPT_TINY if a.tiny else OPT_1_3B, a.seed, a.std, a.force)
    info.update(verify(Path(a.out)))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
