"""Cost model: predicted time of a policy's prefill and decode, and its memory per tier.

Notation for one forward pass over a block of K micro-batches of b sequences,
T new tokens per sequence (T = prompt length in prefill, 1 in decode), S keys
attended (prompt + tokens so far), L layers, item size i, and the placement
fractions w_g, w_c, w_d (weights), c_g, c_c, c_d (KV cache rows), a_g, a_c
(activations) of the policy:

  W    dense bytes of one layer's weights; W' = r_w W with r_w the compressed /
       dense ratio (1 without compression, from quant.quantized_nbytes)
  kv   bytes of one token's keys and values for one sequence in one layer
       (2 Hkv D i), compressed kv' = r_c kv
  n_w  weight fetches per layer per pass: 1 for zig-zag, K for row-by-row

Per layer and pass, each resource is busy for (seconds):

  compute  C = K [ sum_m 2 b T |m| / F(bT, |m|)            matmuls m of the layer
                 + attn                                      see below
                 + o (1 + n_parts) + e b T (h + f) i / E ]   dispatch, elementwise
             + n_w W / Q   (compressed weights)              dequantize, once per fetch
             + K b (S-T) kv / Q   (compressed cache)
       attn = prefill: 4 b H T S D / A_p;  decode: b S kv / A_d, where the share
              of rows (c_c + c_d) uses the host's A_d when CPU attention is on
  disk     D = [n_w w_d W' + K c_d b (S-T) kv'] / R_disk   (read: weights, cache prefix)
             + K c_d b T kv' / W_disk                       (write: the new tokens)
  h2d      H = [n_w (w_c + w_d) W' + K (c_c + c_d) b (S-T) kv' x  + K a_c b T h i] / B_h2d
             (x = 0 when attention runs on the host, which also moves q and out)
  d2h      G = [K (c_c + c_d) b T kv' + K a_c b T h i] / B_d2h          (CUDA only)

F is the profile's matmul rate at that row count and weight size, A the
attention rates, E the elementwise rate, Q the dequantize rate, o the
measured dispatch cost of one layer call; the engine's own bookkeeping per
(layer, micro-batch) step is taken as one more such call per tier holding
cache rows (n_parts), a calibration from SmolLM2 runs on the dev box. On a CPU-only machine there is no
h2d / d2h link (the "gpu" tier is host RAM).

With overlap, a layer's I/O runs while it computes. On a machine with few
cores compute and disk I/O slow each other (profile: s_c = io_slows_compute,
s_i = compute_slows_io). When both run for a while and then the one left
finishes alone, the layer takes

  t = max( D + C s_c (1 - 1/s_i),  C + D s_i (1 - 1/s_c),  H,  G )

(= max(C, D, H, G) when s_c = s_i = 1). Without overlap t = C + D + H + G.
A pass is L t plus the head's compute (LM-head matmul, sampling). The head's
streamed bytes (D_h, H_h: the lm_head as the runtime places it, a whole tensor;
in the LP it follows the layers' fractions) go on the same disk and link as the
layers', so they are added to every layer's D and H as D_h / L and H_h / L: a
link is one queue, and the head's read is hidden only where the layers leave it
idle. (The embedding gather reads only the rows a pass needs: not modelled.)
Every term is affine in the placement fractions, so the search's linear
program uses exactly these expressions.

Throughput (the bench metric) for one block with prompt length P and G
generated tokens: b K G / (t_prefill + sum over decode steps of t_decode(S)),
t_decode evaluated at the mean context P + G/2 (attention and cache I/O are
affine in S, so the mean gives the sum exactly).

Memory per tier comes from memory_plan.weight_demand / block_demand, the same
numbers the runtime checks (Tiers.check_fits); their dependence on the
fractions is affine, taken from the demand at the corner placements.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..config import ModelConfig
from ..errors import InvalidRequestError
from ..memory_plan import block_demand, weight_demand
from ..models import get_model
from ..quant import quantized_nbytes
from .policy import Policy, split_rows
from .profile import HardwareProfile

VARS = ("w_gpu", "w_cpu", "w_disk", "c_gpu", "c_cpu", "c_disk", "a_gpu", "a_cpu")
# Bytes of activations the elementwise ops touch, per token, in units of (hidden + ffn) values.
ELEMENTWISE_PASSES = 6


@dataclass(frozen=True)
class Affine:
    """const + sum coef[v] * v over the placement fractions VARS."""
    const: float = 0.0
    coef: Mapping[str, float] = field(default_factory=dict)

    def __add__(self, o: "Affine | float") -> "Affine":
        if not isinstance(o, Affine):
            return Affine(self.const + o, self.coef)
        c = dict(self.coef)
        for k, v in o.coef.items():
            c[k] = c.get(k, 0.0) + v
        return Affine(self.const + o.const, c)

    __radd__ = __add__

    def __mul__(self, k: float) -> "Affine":
        return Affine(self.const * k, {v: c * k for v, c in self.coef.items()})

    __rmul__ = __mul__

    def __call__(self, x: Mapping[str, float]) -> float:
        return self.const + sum(c * x[v] for v, c in self.coef.items())


def var(name: str, k: float = 1.0) -> Affine:
    return Affine(0.0, {name: k})


@dataclass(frozen=True)
class Workload:
    prompt_len: int = 512
    gen_len: int = 32

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1:
            raise InvalidRequestError(f"a workload needs a prompt length and a generation length of at least 1, "
                                      f"got {self.prompt_len} and {self.gen_len}")


@dataclass(frozen=True)
class PassCost:
    """Seconds of one forward pass over the block, per resource, and the total."""
    compute: float
    disk: float
    h2d: float
    d2h: float
    head: float
    total: float

    @property
    def bottleneck(self) -> str:
        parts = {"compute": self.compute, "disk": self.disk, "cpu->gpu link": self.h2d,
                 "gpu->cpu link": self.d2h}
        return max(parts, key=parts.get)


@dataclass(frozen=True)
class Prediction:
    policy: Policy
    workload: Workload
    prefill: PassCost
    decode: PassCost               # one decode step at the mean context
    prefill_s: float
    decode_s: float                # all decode steps of the block
    throughput: float              # generated tokens / (prefill + decode), tok/s
    memory: dict[str, int]         # bytes per tier the runtime will account

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def bottleneck(self) -> str:
        return self.decode.bottleneck

    def to_dict(self) -> dict[str, Any]:
        pc = lambda p: {k: getattr(p, k) for k in ("compute", "disk", "h2d", "d2h", "head", "total")}  # noqa: E731
        return {"policy": self.policy.to_dict(), "prompt_len": self.workload.prompt_len,
                "gen_len": self.workload.gen_len, "prefill": pc(self.prefill), "decode_step": pc(self.decode),
                "prefill_s": self.prefill_s, "decode_s": self.decode_s, "total_s": self.total_s,
                "throughput": self.throughput, "bottleneck": self.bottleneck, "memory": self.memory}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CostModel:
    """The equations of the module docstring for one model, dtype, profile and workload."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, profile: HardwareProfile, workload: Workload,
                 store: torch.dtype | None = None):
        self.cfg, self.dtype, self.prof, self.wl = cfg, dtype, profile, workload
        self.store = store or dtype    # offloaded weights' dtype (LLM's offload_dtype)
        self.model = get_model(cfg)
        self.it = _itemsize(dtype)
        shapes = self.model.shapes()
        self.layer_shapes = shapes[0]
        self.mats = [s for s in self.layer_shapes.values() if len(s) == 2]
        self.layer_bytes = sum(math.prod(s) for s in self.layer_shapes.values()) * self.it
        self.device = torch.device("cuda" if profile.device == "cuda" else "cpu")
        self._wd: dict[Any, dict[str, dict[str, int]]] = {}

    # ------------------------------------------------------------- sizes
    def weight_ratio(self, policy: Policy) -> float:
        """Bytes of an offloaded layer as stored, per dense byte at the compute dtype."""
        if not policy.compress_weight:
            return _itemsize(self.store) / self.it
        from ..weights.tiered import group_sizes
        return sum(group_sizes(self.model, self.dtype, policy.weight_quant, self.store)[0][0].values()) \
            / self.layer_bytes

    def cache_ratio(self, policy: Policy) -> float:
        """Bytes of the cache as stored, per dense byte at the compute dtype."""
        kv_dt = policy.kv_dtype(self.dtype)
        if not policy.compress_cache:
            return _itemsize(kv_dt) / self.it
        c, cq = self.cfg, policy.cache_quant
        S = max(cq.group_size, self.wl.prompt_len + self.wl.gen_len)
        shape = (S, c.num_kv_heads, c.head_dim)
        dense = math.prod(shape) * self.it
        keys = quantized_nbytes(shape, kv_dt, cq.key(token_dim=0, head_dim=-1))
        vals = quantized_nbytes(shape, kv_dt, cq.value(-1))
        return (keys + vals) / (2 * dense)

    # ------------------------------------------------------------- one pass
    def pass_terms(self, policy: Policy, T: int, S: float) -> dict[str, Affine]:
        """Per-layer seconds of each resource (affine in the fractions) and the head's."""
        c, p, it = self.cfg, self.prof, self.it
        b, K = policy.gpu_batch_size, policy.num_gpu_batches
        dt = _dtype_name(self.dtype)
        cuda = p.device == "cuda"
        decode = T == 1
        n_w = 1 if policy.schedule == "zigzag" else K
        rw, rc = self.weight_ratio(policy), self.cache_ratio(policy)
        W = self.layer_bytes
        kv = 2 * c.num_kv_heads * c.head_dim * it          # one token, one sequence, one layer
        prefix = b * max(S - T, 0.0) * kv                   # cached bytes a micro-batch attends to
        new = b * T * kv
        comp, host = p.compute, p.host

        rows = b * T
        mm = sum(2.0 * rows * math.prod(m) / comp.matmul_rate(dt, rows, math.prod(m)) for m in self.mats)
        # dispatch: the model's layer call, plus the engine's bookkeeping around it (schedule
        # step, cache-part slicing and concatenation), taken as one more call per cache part
        parts = sum(1 for sh in policy.shares("cache") if sh > 0)
        over = comp.layer_overhead_s.get(c.family, 0.0) * (1 + parts)
        elem = ELEMENTWISE_PASSES * rows * (c.hidden_size + c.ffn_dim) * it / comp.elementwise_Bps
        if decode:
            on_dev = b * S * kv / comp.attn_decode_Bps
            on_host = b * S * kv / host.attn_decode_Bps
            if policy.cpu_attention:
                attn = on_dev * var("c_gpu") + on_host * (var("c_cpu") + var("c_disk"))
            else:
                attn = Affine(on_dev)
        else:
            attn = Affine(4.0 * b * c.num_heads * T * S * c.head_dim / comp.attn_prefill_flops)
        compute = K * (attn + (mm + over + elem))
        if policy.compress_weight:
            compute = compute + n_w * W / comp.dequant_Bps
        elif self.store != self.dtype:   # offloaded weights cast to the compute dtype once per block
            compute = compute + (n_w * W / comp.elementwise_Bps) * (var("w_cpu") + var("w_disk"))
        if policy.compress_cache:
            compute = compute + K * prefix / comp.dequant_Bps
        elif policy.kv_dtype(self.dtype) != self.dtype:   # a narrower cache is cast for attention
            compute = compute + K * (prefix + new) / comp.elementwise_Bps

        disk = (n_w * W * rw / p.disk_read_Bps) * var("w_disk") \
            + (K * rc * (prefix / p.disk_read_Bps + new / p.disk_write_Bps)) * var("c_disk")
        h2d, d2h = Affine(), Affine()
        if cuda:
            host_attn = policy.cpu_attention and decode
            h2d = (n_w * W * rw / p.h2d()) * (var("w_cpu") + var("w_disk")) \
                + (K * b * T * c.hidden_size * it / p.h2d()) * var("a_cpu")
            d2h = (K * rc * new / p.d2h()) * (var("c_cpu") + var("c_disk")) \
                + (K * b * T * c.hidden_size * it / p.d2h()) * var("a_cpu")
            qo = 2 * b * T * c.num_heads * c.head_dim * it
            if host_attn:
                h2d = h2d + (K * qo / 2 / p.h2d()) * (var("c_cpu") + var("c_disk"))
                d2h = d2h + (K * qo / 2 / p.d2h()) * (var("c_cpu") + var("c_disk"))
            else:
                h2d = h2d + (K * rc * prefix / p.h2d()) * (var("c_cpu") + var("c_disk"))
        return {"compute": compute, "disk": disk, "h2d": h2d, "d2h": d2h}

    def head_terms(self, policy: Policy, placed: Mapping[str, float] | None = None) -> dict[str, Affine]:
        """LM head for every micro-batch (one token per row) plus sampling, and the
        embedding gather. The head's streamed weights are fetched once per pass on the
        same links as the layers' (pass_cost spreads them over the layers).

        ``placed`` (from fractions()) gives where the runtime really puts the lm_head and
        the token embedding (whole tensors, placed by their own group's shares); without
        it (the search's LP) the head follows the layers' fractions."""
        c, p = self.cfg, self.prof
        b, K = policy.gpu_batch_size, policy.num_gpu_batches
        dt = _dtype_name(self.dtype)
        head_in = c.word_embed_proj_dim
        size = c.vocab_size * head_in
        mm = 2.0 * b * size / p.compute.matmul_rate(dt, b, size)
        sample = 3 * b * c.vocab_size * 4 / p.compute.elementwise_Bps
        from ..weights.tiered import stored_nbytes
        quant = policy.weight_quant if policy.compress_weight else None
        hb = stored_nbytes("head", "lm_head", (c.vocab_size, head_in), self.dtype, quant,
                           c.tie_word_embeddings, "cpu", self.store)   # a tied head stays dense
        if placed is not None:
            on_disk, on_cpu = Affine(placed["head_disk"]), Affine(placed["head_cpu"])
        else:
            on_disk, on_cpu = var("w_disk"), var("w_cpu")
        disk = (hb / p.disk_read_Bps) * on_disk
        h2d = (hb / p.h2d()) * (on_cpu + on_disk) if p.device == "cuda" else Affine()
        return {"compute": Affine(K * (mm + sample)), "disk": disk, "h2d": h2d}

    def pass_layer_terms(self, policy: Policy, T: int, S: float,
                         placed: Mapping[str, float] | None = None) -> dict[str, Affine]:
        """pass_terms with the head's streamed bytes spread over the L layers: the disk
        and the link are one queue each, so the head's read takes its turn among the
        layers' reads (it is hidden only when the layers leave that link idle)."""
        t = dict(self.pass_terms(policy, T, S))
        head = self.head_terms(policy, placed)
        L = self.cfg.num_layers
        t["disk"] = t["disk"] + head["disk"] * (1.0 / L)
        t["h2d"] = t["h2d"] + head["h2d"] * (1.0 / L)
        return t

    def combine(self, policy: Policy, t: Mapping[str, float]) -> float:
        """One layer's time from its per-resource seconds (module docstring)."""
        C, D, H, G = t["compute"], t["disk"], t["h2d"], t["d2h"]
        if not policy.overlap:
            return C + D + H + G
        return max(self.overlap_terms(C, D) + [H, G])

    def overlap_terms(self, C: Any, D: Any) -> list[Any]:
        sc, si = self.prof.io_slows_compute, self.prof.compute_slows_io
        return [D + C * (sc * (1 - 1 / si)), C + D * (si * (1 - 1 / sc))]

    def pass_cost(self, policy: Policy, x: Mapping[str, float], T: int, S: float) -> PassCost:
        L = self.cfg.num_layers
        placed = x if "head_disk" in x else None
        terms = {k: v(x) for k, v in self.pass_layer_terms(policy, T, S, placed).items()}
        head = {k: v(x) for k, v in self.head_terms(policy, placed).items()}
        total = L * self.combine(policy, terms) + head["compute"]
        return PassCost(compute=L * terms["compute"] + head["compute"], disk=L * terms["disk"],
                        h2d=L * terms["h2d"], d2h=L * terms["d2h"], head=head["compute"], total=total)

    # ------------------------------------------------------------- placement
    def fractions(self, policy: Policy) -> dict[str, float]:
        """The fractions the runtime really uses: weights by whole tensors (a layer's
        bytes per tier), cache and activations by whole rows of a micro-batch."""
        from ..weights.tiered import group_sizes, place_group
        quant = policy.weight_quant if policy.compress_weight else None
        sizes = group_sizes(self.model, self.dtype, quant, self.store)[0][0]    # layer 0, bytes as stored
        place = place_group(sizes, policy.shares("w"))
        wb = {"gpu": 0, "cpu": 0, "disk": 0}
        for k, n in sizes.items():
            wb[place[k]] += n
        tot = sum(wb.values())
        b = policy.gpu_batch_size
        cg, cc, cd = split_rows(b, policy.shares("cache"))
        ag, ac, ad = split_rows(b, policy.shares("act"))
        head_sizes = group_sizes(self.model, self.dtype, quant, self.store)[0]["head"]
        head_tier = place_group(head_sizes, policy.shares("w"))["lm_head"]
        return {"w_gpu": wb["gpu"] / tot, "w_cpu": wb["cpu"] / tot, "w_disk": wb["disk"] / tot,
                "c_gpu": cg / b, "c_cpu": cc / b, "c_disk": cd / b, "a_gpu": ag / b, "a_cpu": (ac + ad) / b,
                # not LP variables: where the lm_head really goes (head_terms)
                "head_cpu": float(head_tier == "cpu"), "head_disk": float(head_tier == "disk")}

    def memory(self, policy: Policy) -> dict[str, int]:
        """Bytes per tier the runtime accounts for this policy (weights + one block)."""
        wl = self.wl
        w = self.weight_demand(policy)
        blk = block_demand(self.cfg, self.dtype, policy, self.device, policy.gpu_batch_size,
                           policy.num_gpu_batches, wl.prompt_len, wl.gen_len)
        return {t: sum(w.get(t, {}).values()) + sum(blk.get(t, {}).values()) for t in ("gpu", "cpu", "disk")}

    def weight_demand(self, policy: Policy) -> dict[str, dict[str, int]]:
        """memory_plan.weight_demand, memoised: it walks every tensor, and the search
        asks for the same few placements for every block shape."""
        key = (policy.shares("w"), policy.compress_weight, policy.weight_quant, policy.overlap)
        if key not in self._wd:
            self._wd[key] = weight_demand(self.model, self.dtype, policy, self.device, self.store)
        return self._wd[key]

    def memory_affine(self, policy: Policy) -> dict[str, Affine]:
        """memory() as an affine function of the fractions, from the corner placements:
        weights, cache and activations are accounted separately, each linear in its shares."""
        def mem(w: tuple, cch: tuple, act: tuple) -> dict[str, int]:
            pol = _with_shares(policy, w, cch, act)
            return self.memory(pol)
        base_w, base_c, base_a = (0, 0), (0, 0), (100, 0)
        m0 = mem(base_w, base_c, base_a)
        out = {t: Affine(float(m0[t])) for t in m0}
        for name, (wv, cv, av) in {"w_gpu": ((100, 0), base_c, base_a), "w_cpu": ((0, 100), base_c, base_a),
                                   "c_gpu": (base_w, (100, 0), base_a), "c_cpu": (base_w, (0, 100), base_a),
                                   "a_cpu": (base_w, base_c, (0, 100))}.items():
            m = mem(wv, cv, av)
            for t in out:
                out[t] = out[t] + var(name, float(m[t] - m0[t]))
        return out

    # ------------------------------------------------------------- prediction
    def predict(self, policy: Policy, x: Mapping[str, float] | None = None) -> Prediction:
        x = x or self.fractions(policy)
        P, G = self.wl.prompt_len, self.wl.gen_len
        pre = self.pass_cost(policy, x, P, P)
        dec = self.pass_cost(policy, x, 1, P + G / 2)
        decode_s = (G - 1) * dec.total
        gen = policy.block_size * G
        return Prediction(policy=policy, workload=self.wl, prefill=pre, decode=dec, prefill_s=pre.total,
                          decode_s=decode_s, throughput=gen / (pre.total + decode_s), memory=self.memory(policy))


def _with_shares(policy: Policy, w: tuple, c: tuple, a: tuple) -> Policy:
    from dataclasses import replace
    return replace(policy, w_gpu_percent=w[0], w_cpu_percent=w[1], cache_gpu_percent=c[0],
                   cache_cpu_percent=c[1], act_gpu_percent=a[0], act_cpu_percent=a[1])


def predict(cfg: ModelConfig, dtype: torch.dtype, profile: HardwareProfile, policy: Policy,
            workload: Workload = Workload()) -> Prediction:
    return CostModel(cfg, dtype, profile, workload).predict(policy)
