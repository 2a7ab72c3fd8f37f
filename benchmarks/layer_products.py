"""One decoder layer's four products, tiergen's product kernel against oneDNN, side by side.

The products of a Llama-family layer as tiergen runs them: Q/K/V as one, O plus the
residual, gate and up as one with SiLU(g) * u, down plus the residual. oneDNN gets its
packed weights and the SiLU pass it needs after (tiergen/kernels/rowwise.cpp); the kernel
(tiergen/kernels/linear.cpp on AMX, linear_avx512.cpp on AVX-512 BF16) gets its packed weights and does the SiLU and the
residual in its epilogue. Everything is in cache (the same inputs every call), the two
alternate, and each figure is the best of ``--repeats`` calls.

    python benchmarks/layer_products.py                    # SmolLM2-135M's widths
    python benchmarks/layer_products.py --hidden 2048 --ffn 8192 --heads 32 --kv-heads 32 --head-dim 64
"""
from __future__ import annotations

import argparse
import os
import sys
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512, 1024, 2730])
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()

    from benchmarks.memory_peak import best_of
    from tiergen import kernels
    from tiergen.weights import prepack, tiles
    if not tiles.serves(torch.bfloat16):
        print("no bfloat16 product kernel on this CPU: nothing to compare", file=sys.stderr)
        return 1
    lin, rw = kernels.linear_kernel(), kernels.load("rowwise")
    E, F, D = a.hidden, a.ffn, a.head_dim
    shapes = {"qkv": ((a.heads + 2 * a.kv_heads) * D, E), "o": (E, a.heads * D), "gate_up": (2 * F, E),
              "down": (E, F)}
    g = torch.Generator().manual_seed(0)
    tiled = {k: tiles.TilePacked((torch.randn(n, k_, generator=g) * 0.02).bfloat16()) for k, (n, k_) in shapes.items()}
    packed = {k: prepack.pack(t.dense()) for k, t in tiled.items()}
    print(f"layer: hidden {E}, ffn {F}, {a.heads} heads / {a.kv_heads} K/V heads of {D}; "
          f"{torch.get_num_threads()} threads; kernel {lin.__name__.removeprefix('tiergen_').rsplit('_', 1)[0]}")
    print("rows | oneDNN + SiLU pass (us) | kernel (us) | oneDNN / kernel")
    for m in a.rows:
        x = {k: torch.randn(m, k_, generator=g).bfloat16() for k, (_, k_) in shapes.items()}
        res = torch.randn(m, E, generator=g).bfloat16()

        def onednn() -> None:
            prepack.packed_linear(x["qkv"], packed["qkv"])
            prepack.linear_binary(x["o"], res, packed["o"], None, "add")
            rw.silu_mul(prepack.packed_linear(x["gate_up"], packed["gate_up"]))
            prepack.linear_binary(x["down"], res, packed["down"], None, "add")

        def tile() -> None:
            tiles.product(lin, x["qkv"], tiled["qkv"])
            tiles.product(lin, x["o"], tiled["o"], other=res)
            tiles.product(lin, x["gate_up"], tiled["gate_up"], gated=True)
            tiles.product(lin, x["down"], tiled["down"], other=res)

        o = t = float("inf")
        for _ in range(2):   # alternating, so a drift of the host touches both
            o = min(o, best_of(onednn, a.repeats))
            t = min(t, best_of(tile, a.repeats))
        print(f"{m} | {o * 1e6:.0f} | {t * 1e6:.0f} | {o / t:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
