"""Policy: where weights, KV cache and activations live, and the block shape.

Field names follow FlexGen so published policies replay as written: each
``*_gpu_percent`` / ``*_cpu_percent`` pair is a share of that kind of tensor on
the compute device / host RAM; disk gets the rest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from ..errors import InvalidRequestError
from ..quant import WEIGHT_QUANT, KVQuantConfig, QuantConfig
from ..schedule import SCHEDULES


# the dtypes by their torch names (the LLM adds its short aliases)
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Policy:
    gpu_batch_size: int = 32
    num_gpu_batches: int = 1
    w_gpu_percent: float = 100.0
    w_cpu_percent: float = 0.0
    cache_gpu_percent: float = 100.0
    cache_cpu_percent: float = 0.0
    act_gpu_percent: float = 100.0
    act_cpu_percent: float = 0.0
    overlap: bool = True          # prefetch the next step's weights/cache while computing
    cpu_attention: bool = False   # decode attention next to a host/disk cache, on the CPU
    pin_weight: bool = True       # page-locked host weights (CUDA), for async copies
    schedule: str = "zigzag"      # "zigzag" | "row"
    compress_weight: bool = False # group-wise n-bit weights (norms and biases stay dense)
    compress_cache: bool = False  # group-wise n-bit KV cache, on every tier
    weight_quant: QuantConfig = WEIGHT_QUANT
    cache_quant: KVQuantConfig = KVQuantConfig()
    # precision the KV cache is stored at, on every tier (None: the compute dtype);
    # "bfloat16" halves a float32 run's cache bytes, and attention reads it back cast
    cache_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.gpu_batch_size < 1 or self.num_gpu_batches < 1:
            raise InvalidRequestError("gpu_batch_size and num_gpu_batches must be >= 1")
        for kind in ("w", "cache", "act"):
            g, c = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            if not (0 <= g <= 100 and 0 <= c <= 100 and g + c <= 100 + 1e-9):
                raise InvalidRequestError(
                    f"{kind} percents must be in [0, 100] and sum to at most 100, got gpu {g} cpu {c}")
        if self.act_gpu_percent + self.act_cpu_percent < 100 - 1e-9:
            raise InvalidRequestError("activations live on the compute device or the host: "
                                      "act_gpu_percent + act_cpu_percent must be 100")
        if self.cache_dtype is not None and self.cache_dtype not in DTYPE_NAMES:
            raise InvalidRequestError(f"cache_dtype must be one of {', '.join(DTYPE_NAMES)}, "
                                      f"got {self.cache_dtype!r}")
        if self.schedule not in SCHEDULES:
            raise InvalidRequestError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")

    @classmethod
    def from_percent(cls, percent: Sequence[float], **kw: Any) -> "Policy":
        """FlexGen's six numbers: weights gpu/cpu, cache gpu/cpu, activations gpu/cpu."""
        if len(percent) != 6:
            raise InvalidRequestError(f"--percent takes 6 numbers, got {len(percent)}")
        w_g, w_c, c_g, c_c, a_g, a_c = (float(x) for x in percent)
        return cls(w_gpu_percent=w_g, w_cpu_percent=w_c, cache_gpu_percent=c_g, cache_cpu_percent=c_c,
                   act_gpu_percent=a_g, act_cpu_percent=a_c, **kw)

    @property
    def percent(self) -> tuple[float, ...]:
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent,
                self.cache_cpu_percent, self.act_gpu_percent, self.act_cpu_percent)

    def shares(self, kind: str) -> tuple[float, float, float]:
        """(gpu, cpu, disk) fractions for "w", "cache" or "act"."""
        g = getattr(self, f"{kind}_gpu_percent") / 100
        c = getattr(self, f"{kind}_cpu_percent") / 100
        return g, c, max(0.0, 1.0 - g - c)

    def kv_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The KV cache's stored dtype for a run computing in ``compute``."""
        return compute if self.cache_dtype is None else DTYPE_NAMES[self.cache_dtype]

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the quant configs become plain dicts with dtype names."""
        d = asdict(self)
        for key in ("weight_quant", "cache_quant"):
            d[key] = {k: (str(v).removeprefix("torch.") if hasattr(v, "is_floating_point") else v)
                      for k, v in d[key].items()}
        return d


def split_rows(n: int, shares: tuple[float, float, float]) -> tuple[int, int, int]:
    """Whole sequences per tier for a micro-batch of n rows (gpu, cpu, disk)."""
    g = round(n * shares[0])
    c = min(n - g, round(n * (shares[0] + shares[1])) - g)
    return g, c, n - g - c
