"""Int8 matmul schemes for the CPU float32 path on SmolLM2-135M (issue 6): accuracy and speed.

Every projection of the layers goes through ``tiergen.models.llama.linear``; this probe
monkeypatches that one function (tiergen itself is untouched) with a scheme that quantizes
weights (offline, once) and activations (per call) and multiplies with ``torch._int_mm``
(int8 x int8 -> int32, VNNI on this CPU), then measures

* perplexity of the embedded SmolLM2-135M (GGUF Q4_1 dequantized to float32) on 8192 tokens
  of CPython's ``pydoc_data/topics.py`` in windows of 512 (as benchmarks/ppl_table.py),
* the speed of each scheme's linear (activation quantization + int matmul(s) + rescale, weights
  pre-quantized and pre-transposed) against ``F.linear`` in float32, at 256 rows (decode at
  batch 256), 1365 rows (the engine's CPU layer chunk, 8 MiB / (1536 * 4 B)) and 4096 rows,
  summed over one layer's projections (stacked qkv, o, gate, up, down),
* the LM head (576 -> 49152) in int8: greedy-argmax agreement with float32 and its speed.

Schemes (W: weights, A: activations; "sym": symmetric, scales per output channel / per token):

  fp32         the engine as is
  fbgemm       torch.ops.quantized.linear_dynamic (fused, but activations per *tensor*)
  w8           int8 weights only (activations float, float matmul): the weights' share of the error
  a8           int8 activations only (weights float): the activations' share of the error
  w8a8         naive W8A8, one _int_mm
  w8a16        (a) activation = s1*q1 + s2*q2 (hi + lo int8 parts), two _int_mm sharing the weight
  w8a8-kN      (b) K split in N chunks, a weight scale per (output channel, chunk) and an activation
               scale per (token, chunk): N _int_mm calls of K/N
  w8a8-asym    (d) per-token asymmetric activations: uint8 codes shifted to int8 and the zero
               point corrected with the weight's precomputed column sums (still one _int_mm)
  sq-A         (c) SmoothQuant: per-input-channel s_j = max|x_j|^A / max|W_j|^(1-A), activation
               maxima from a calibration pass over a *different* text (docstrings of other stdlib
               modules); simulated as x/s, W*s, which folds exactly into attn_norm (q,k,v),
               ffn_norm (gate, up), the v rows of w_qkv (o; s shared by the 3 query heads of a kv head)
               and the up rows of w_gate_up (down), so it costs nothing at run time
  sq-A-asym    (c)+(d)
  ol-N         W8A8 except N fixed input channels per input site (largest calibration max), which
               stay float: one _int_mm plus a [M,N] @ [N,out] float matmul (LLM.int8 with static outliers)
  only-KEY     W8A8 on one kind of projection only (sensitivity, for (e))
  no-KEYS      W8A8 everywhere except KEYS (e)
  head-*       LM head in int8 too

    flock /tmp/tiergen-cpu.lock python benchmarks/int8_probe.py --ppl fp32,w8a8 --speed
    python benchmarks/int8_probe.py --table           # merge what the runs saved

Results accumulate in --out (JSON, keyed by scheme) so the work can be split into short runs.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import tiergen.models.base as B  # noqa: E402
import tiergen.models.llama as L  # noqa: E402
from tiergen.weights import prepack  # noqa: E402

# tiergen stores q, k and v stacked as one w_qkv, gate and up as one w_gate_up (tiergen/weights/fusion.py)
KEYS = ("w_qkv", "wo", "w_gate_up", "w_down")
SITE = {"w_qkv": "attn", "wo": "o", "w_gate_up": "mlp", "w_down": "down"}
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 576, 1536, 49152, 9, 3, 64
SHAPES = {"w_qkv": (960, 576), "wo": (576, 576), "w_gate_up": (2 * FFN, 576), "w_down": (576, 1536)}


@contextlib.contextmanager
def route_linears(fn):
    """Every product of the layers and the head through ``fn(x, w, b)``: llama's own ``linear``
    and the one the base helpers call (gated MLP, residual adds, head); ``load`` keeps the
    weights plain, so no fused oneDNN epilogue bypasses it."""
    saved = L.linear, B.linear
    L.linear = B.linear = fn
    try:
        yield
    finally:
        L.linear, B.linear = saved


# ----------------------------------------------------------------- quantizers
def q_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x ~ q * s, s [M,1]."""
    s = x.abs().amax(1, keepdim=True).clamp_min_(1e-8).div_(127)
    return torch.round(x / s).to(torch.int8), s


def q_rows_asym(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 8-bit per row, codes shifted to int8: x ~ s * q + c, s and c [M,1]."""
    lo, hi = x.aminmax(dim=1, keepdim=True)
    s = (hi - lo).clamp_min_(1e-8).div_(255)
    q = torch.round((x - lo) / s).sub_(128).to(torch.int8)
    return q, s, lo + 128 * s


class Prepared:
    """One weight, quantized for a scheme: everything a call needs besides x."""

    def __init__(self, w: torch.Tensor, chunks: int = 1, smooth: torch.Tensor | None = None,
                 outliers: torch.Tensor | None = None):
        self.n, self.k = w.shape
        self.smooth = smooth                   # x is divided by it, w multiplied by it
        if smooth is not None:
            w = w * smooth[None, :]
        self.outliers = outliers               # input channels kept in float (LLM.int8-style, static)
        if outliers is not None:
            self.w_ol = w[:, outliers].t().contiguous()       # [n_ol, N] float
            w = w.index_fill(1, outliers, 0.0)
        self.chunks = chunks
        c = self.k // chunks
        wq, ws = [], []
        for i in range(chunks):
            q, s = q_rows(w[:, i * c:(i + 1) * c])
            wq.append(q.t().contiguous())      # [K/c, N] for _int_mm(x [M,K/c], w)
            ws.append(s.view(1, -1))
        self.wq, self.ws = wq, ws
        self.colsum = wq[0].sum(0, dtype=torch.int32).float().view(1, -1) if chunks == 1 else None
        self.wdq = torch.cat([(q.t().float() * s.view(-1, 1)) for q, s in zip(wq, ws)], 1)
        if smooth is not None:
            self.wdq = self.wdq / smooth[None, :]


def mm_w8a8(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    q, s = q_rows(x)
    return torch._int_mm(q, p.wq[0]).float().mul_(s).mul_(p.ws[0])


def mm_w8a16(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    q1, s1 = q_rows(x)
    q2, s2 = q_rows(x - q1 * s1)
    y = torch._int_mm(q1, p.wq[0]).float().mul_(s1)
    y.addcmul_(torch._int_mm(q2, p.wq[0]).float(), s2)
    return y.mul_(p.ws[0])


def mm_chunks(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    c = p.k // p.chunks
    y = None
    for i in range(p.chunks):
        q, s = q_rows(x[:, i * c:(i + 1) * c])
        t = torch._int_mm(q, p.wq[i]).float().mul_(s).mul_(p.ws[i])
        y = t if y is None else y.add_(t)
    return y


def mm_asym(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    q, s, c = q_rows_asym(x)
    y = torch._int_mm(q, p.wq[0]).float().mul_(s)
    return y.addmm_(c, p.colsum).mul_(p.ws[0])   # + c * colsum(Wq), then the weight scale


def fbgemm_pack(w: torch.Tensor):
    """fbgemm's fused dynamic-quant linear: int8 per-channel weights, activations quantized per
    *tensor* (asymmetric uint8) inside the op, float out."""
    s = w.abs().amax(1).clamp_min(1e-8) / 127
    qw = torch.quantize_per_channel(w, s.double(), torch.zeros_like(s, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


def mm_outlier(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    """W8A8 over all but a few fixed input channels, which stay float (a [M,n] @ [n,N] matmul)."""
    y = mm_w8a8(p, x.index_fill(1, p.outliers, 0.0))
    return y.addmm_(x[:, p.outliers], p.w_ol)


def mm_fbgemm(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    if getattr(p, "packed", None) is None:
        p.packed = fbgemm_pack(p.wdq)
    return torch.ops.quantized.linear_dynamic(x, p.packed, False)


def mm_w8(p: Prepared, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, p.wdq)


def mm_a8(p: Prepared, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    q, s = q_rows(x)
    return F.linear(q.float() * s, w)


# ----------------------------------------------------------------- schemes
class Scheme:
    def __init__(self, name: str, kind: str, keys: tuple[str, ...] = KEYS, chunks: int = 1,
                 alpha: float | None = None, head: bool = False):
        self.name, self.kind, self.keys, self.chunks, self.alpha, self.head = name, kind, keys, chunks, alpha, head
        self.n_outliers = 0

    def with_outliers(self, n: int) -> "Scheme":
        self.n_outliers = n
        return self


def parse_scheme(name: str) -> Scheme:
    head = name.endswith("+head")
    base = name[:-5] if head else name
    if base in ("fp32", "w8", "a8", "w8a8", "w8a16", "w8a8-asym", "fbgemm"):
        kind = {"w8a8-asym": "asym"}.get(base, base)
        return Scheme(name, kind, head=head)
    if base.startswith("w8a8-k"):
        return Scheme(name, "chunks", chunks=int(base[6:]), head=head)
    if base.startswith("sq-"):
        parts = base.split("-")
        return Scheme(name, "asym" if parts[-1] == "asym" else "w8a8", alpha=float(parts[1]), head=head)
    if base.startswith("ol-"):
        return Scheme(name, "outlier", chunks=1, alpha=None, head=head).with_outliers(int(base[3:]))
    if base.startswith("only-"):
        return Scheme(name, "w8a8", keys=(base[5:],), head=head)
    if base.startswith("no-"):
        drop = set(base[3:].split("+"))
        return Scheme(name, "w8a8", keys=tuple(k for k in KEYS if k not in drop), head=head)
    raise SystemExit(f"unknown scheme {name}")


MM = {"outlier": mm_outlier, "fbgemm": mm_fbgemm, "w8": mm_w8, "w8a8": mm_w8a8, "w8a16": mm_w8a16, "chunks": mm_chunks, "asym": mm_asym}


# ----------------------------------------------------------------- calibration (SmoothQuant)
def calibration_text() -> str:
    """Docstrings of stdlib modules that share nothing with pydoc_data/topics.py's text."""
    import argparse as m1, collections as m2, json as m3, logging as m4, pathlib as m5, textwrap as m6
    docs = []
    for m in (m1, m2, m3, m4, m5, m6):
        docs.append(inspect.getdoc(m) or "")
        for _, obj in inspect.getmembers(m):
            d = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)) else None
            if d and d not in docs:
                docs.append(d)
    return "\n\n".join(docs)


def calibrate(llm, names: dict[int, tuple], tokens: int) -> dict[tuple, torch.Tensor]:
    """Per-input-channel max |x| of every projection over `tokens` tokens of calibration text."""
    amax: dict[tuple, torch.Tensor] = {}
    orig = B.linear

    def rec(x, w, b=None):
        nm = names.get(w.data_ptr())
        if nm is not None and nm[0] != "head":
            m = x.reshape(-1, x.shape[-1]).abs().amax(0)
            amax[nm] = torch.maximum(amax[nm], m) if nm in amax else m
        return orig(x, w, b)
    ids = llm.encode(calibration_text())[:tokens]
    with route_linears(rec):
        llm.perplexity(token_ids=ids, window=512, stride=512)
    return amax


def smooth_factors(weights: dict[tuple, torch.Tensor], amax: dict[tuple, torch.Tensor],
                   alpha: float) -> dict[tuple, torch.Tensor]:
    """s per (layer, key); projections reading the same input share one s (it is folded once)."""
    out = {}
    layers = sorted({g for g, _ in weights if isinstance(g, int)})
    for g in layers:
        for site in ("attn", "o", "mlp", "down"):
            keys = [k for k in KEYS if SITE[k] == site]
            xa = torch.stack([amax[(g, k)] for k in keys]).amax(0)
            wa = torch.stack([weights[(g, k)].abs().amax(0) for k in keys]).amax(0)
            if site == "o":   # o's input channel (h, d) comes from v's (h // 3, d): share over the group
                rep = HEADS // KV_HEADS
                xa = xa.view(KV_HEADS, rep, HEAD_DIM).amax(1, keepdim=True).expand(-1, rep, -1).reshape(-1)
                wa = wa.view(KV_HEADS, rep, HEAD_DIM).amax(1, keepdim=True).expand(-1, rep, -1).reshape(-1)
            s = (xa.clamp_min(1e-5).pow(alpha) / wa.clamp_min(1e-5).pow(1 - alpha)).clamp_min(1e-5)
            for k in keys:
                out[(g, k)] = s
    return out


# ----------------------------------------------------------------- perplexity
def load():
    from tiergen import LLM, Policy
    # plain weights: packed ones have no data pointer to name them by, and their products
    # (with fused epilogues) would not pass through route_linears
    prepack.available = lambda dtype: False
    prepack.epilogues_available.cache_clear()   # an earlier answer would still fuse residual adds
    llm = LLM("smollm2-135m", dtype="float32", policy=Policy(gpu_batch_size=32))
    names, weights = {}, {}
    for g, homes in llm.weights.homes.items():
        for k, h in homes.items():
            if h.tensor is not None and h.tensor.dim() == 2:
                names[h.tensor.data_ptr()] = (g, k)
                weights[(g, k)] = h.tensor
    return llm, names, weights


def run_ppl(llm, names, weights, sc: Scheme, ids: list[int], amax) -> dict:
    smooth = smooth_factors(weights, amax, sc.alpha) if sc.alpha is not None else {}
    outl = {}
    if sc.n_outliers:   # the input channels with the largest calibration max, per input site
        for (g, k) in weights:
            if g != "head":
                xa = torch.stack([amax[(g, j)] for j in KEYS if SITE[j] == SITE[k]]).amax(0)
                outl[(g, k)] = xa.topk(sc.n_outliers).indices.sort().values
    prep: dict[int, Prepared] = {}
    for ptr, (g, k) in names.items():
        if (g != "head" and k in sc.keys and sc.kind != "fp32") or (g, k) == ("head", "lm_head") and sc.head:
            prep[ptr] = Prepared(weights[(g, k)], chunks=sc.chunks, smooth=smooth.get((g, k)),
                                 outliers=outl.get((g, k)))
    orig = B.linear
    agree = [0, 0]

    def patched(x, w, b=None):
        p = prep.get(w.data_ptr())
        if p is None:
            return orig(x, w, b)
        shp = x.shape
        x2 = x.reshape(-1, shp[-1])
        if p.smooth is not None:
            x2 = x2 / p.smooth
        if sc.kind == "a8" and p.n != VOCAB:
            y = mm_a8(p, x2, w)
        elif p.n == VOCAB:
            y = mm_w8a8(p, x2)
            ref = F.linear(x2, w).argmax(1)
            agree[0] += int((y.argmax(1) == ref).sum())
            agree[1] += ref.numel()
        else:
            y = MM[sc.kind](p, x2)
        if b is not None:
            y = y + b
        return y.reshape(*shp[:-1], -1).to(x.dtype)
    t = time.perf_counter()
    with route_linears(patched):
        r = llm.perplexity(token_ids=ids, window=512, stride=512)
    out = {"ppl": r.ppl, "ppl_s": time.perf_counter() - t}
    if agree[1]:
        out["head_argmax_agree"] = agree[0] / agree[1]
    return out


# ----------------------------------------------------------------- speed
def bench(fn, reps: int, min_s: float = 0.3) -> float:
    fn()
    fn()
    best = math.inf
    t_end = time.perf_counter() + min_s
    n = 0
    while n < reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def speed(kinds: list[str], rows: list[int]) -> dict:
    """Seconds per layer (every projection, each scheme's full linear) and per LM head call."""
    torch.manual_seed(0)
    ws = {k: torch.randn(*s) * 0.05 for k, s in SHAPES.items()}
    ws["lm_head"] = torch.randn(VOCAB, HIDDEN) * 0.05
    res: dict = {}
    for m in rows:
        xs = {HIDDEN: torch.randn(m, HIDDEN), FFN: torch.randn(m, FFN)}
        for kind in ["fp32"] + kinds:
            sc = parse_scheme(kind)
            if sc.kind == "fp32":
                fns = {k: (lambda w=w, x=xs[w.shape[1]]: F.linear(x, w)) for k, w in ws.items()}
            else:
                fns = {}
                for k, w in ws.items():
                    if k == "lm_head" and sc.kind not in ("w8a8", "asym"):
                        continue
                    ol = torch.randperm(w.shape[1])[:sc.n_outliers].sort().values if sc.n_outliers else None
                    p = Prepared(w, chunks=sc.chunks, outliers=ol if k != "lm_head" else None)
                    mm = mm_w8a8 if k == "lm_head" else MM[sc.kind]
                    fns[k] = (lambda p=p, mm=mm, x=xs[w.shape[1]]: mm(p, x))
            layer = sum(bench(fns[k], 5) for k in KEYS)
            res[f"{kind}@{m}"] = {"layer_s": layer}
            if "lm_head" in fns and m <= 1365:
                res[f"{kind}@{m}"]["head_s"] = bench(fns["lm_head"], 3)
            print(f"  speed {kind:>10} rows {m:5d}: layer {layer * 1e3:7.2f} ms"
                  + (f", head {res[f'{kind}@{m}']['head_s'] * 1e3:7.2f} ms" if "head_s" in res[f"{kind}@{m}"] else ""),
                  flush=True)
    return res


def constraints() -> list[str]:
    """Which shapes torch._int_mm accepts on this CPU."""
    out = []
    for m, k, n in [(1, 576, 576), (7, 576, 576), (17, 576, 576), (255, 576, 576), (256, 576, 192),
                    (256, 100, 576), (256, 576, 100), (256, 144, 576), (256, 36, 576), (16, 576, 49152)]:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        for layout, bb in (("B=[K,N] contig", b.t().contiguous()), ("B=w.t() view", b.t())):
            try:
                y = torch._int_mm(a, bb)
                ok = torch.equal(y, (a.int() @ bb.int()))
                out.append(f"M={m} K={k} N={n} {layout}: {'ok' if ok else 'WRONG RESULT'}")
            except Exception as e:  # noqa: BLE001
                out.append(f"M={m} K={k} N={n} {layout}: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
    return out


# ----------------------------------------------------------------- main
def speed_kind(name: str) -> str:
    """The timed kernel a scored scheme runs (smoothing folds away; sensitivity rows run w8a8)."""
    sc = parse_scheme(name)
    return {"asym": "w8a8-asym", "chunks": f"w8a8-k{sc.chunks}",
            "outlier": f"ol-{sc.n_outliers}"}.get(sc.kind, sc.kind)


def table(res: dict) -> str:
    base = res.get("ppl", {}).get("fp32", {}).get("ppl")
    sp = res.get("speed", {})
    lines = ["| scheme | ppl | vs fp32 | head argmax agree | layer speedup @256 | @1365 | @4096 | head speedup @256 |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res.get("ppl", {}).items():
        d = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "-"
        kind = speed_kind(name)

        def su(m: int, what: str = "layer_s") -> str:
            f, q = sp.get(f"fp32@{m}", {}).get(what), sp.get(f"{kind}@{m}", {}).get(what)
            return f"{f / q:.2f}x" if f and q else "-"
        agree = f"{100 * r['head_argmax_agree']:.2f}%" if "head_argmax_agree" in r else "-"
        hs = su(256, "head_s") if name.endswith("+head") else "-"
        lines.append(f"| {name} | {r['ppl']:.3f} | {d} | {agree} | {su(256)} | {su(1365)} | {su(4096)} | {hs} |")
    if sp:
        lines.append("")
        lines.append(f"ms per layer ({len(KEYS)} projections) / per LM head call:")
        for k, v in sp.items():
            lines.append(f"  {k:>18}: layer {v['layer_s'] * 1e3:7.2f}" +
                         (f"  head {v['head_s'] * 1e3:7.2f}" if "head_s" in v else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ppl", default="", help="comma-separated schemes to score (see the docstring)")
    ap.add_argument("--speed", default="", help="comma-separated schemes to time ('all': every kind)")
    ap.add_argument("--rows", default="256,1365,4096")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--constraints", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--out", default="/tmp/int8_probe.json")
    a = ap.parse_args()
    torch.manual_seed(0)
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {}
    if a.constraints:
        res["constraints"] = constraints()
        print("\n".join(res["constraints"]))
    if a.ppl:
        from ppl_table import text
        llm, names, weights = load()
        ids = llm.encode(text())[:a.tokens]
        amax = None
        schemes = [parse_scheme(s) for s in a.ppl.split(",")]
        if any(s.alpha is not None or s.n_outliers for s in schemes):
            amax = calibrate(llm, names, a.calib_tokens)
        for sc in schemes:
            r = run_ppl(llm, names, weights, sc, ids, amax)
            res.setdefault("ppl", {})[sc.name] = r
            print(f"{sc.name:>22}: ppl {r['ppl']:.4f}" +
                  (f"  head argmax agree {100 * r['head_argmax_agree']:.2f}%" if "head_argmax_agree" in r else "")
                  + f"  ({r['ppl_s']:.0f} s)", flush=True)
            out.write_text(json.dumps(res, indent=1))
    if a.speed:
        kinds = ["w8", "w8a8", "w8a16", "w8a8-k2", "w8a8-k4", "w8a8-asym", "fbgemm"] if a.speed == "all" else a.speed.split(",")
        torch.set_num_threads(torch.get_num_threads())
        res.setdefault("speed", {}).update(speed(kinds, [int(r) for r in a.rows.split(",")]))
        out.write_text(json.dumps(res, indent=1))
    out.write_text(json.dumps(res, indent=1))
    if a.table or a.ppl or a.speed:
        print(table(res))


if __name__ == "__main__":
    main()
