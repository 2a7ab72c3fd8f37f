"""ModelConfig: one frozen dataclass describing every supported family.

Two families of math exist (``models/opt.py`` and ``models/llama.py``); the
many checkpoint dialects (Llama 2/3, Mistral, Qwen2, SmolLM2, OPT) are just
different field values here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping

from .errors import CheckpointError, ModelNotFoundError, UnknownModelError

# HF model_type -> our family of math.
_HF_FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama"}


@dataclass(frozen=True)
class ModelConfig:
    family: str                      # "opt" | "llama": which math to run
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_position: int                # context length
    num_kv_heads: int = 0            # 0 -> num_heads (no GQA)
    head_dim: int = 0                # 0 -> hidden_size // num_heads
    norm_eps: float = 1e-5
    activation: str = "silu"
    arch: str = ""                   # the checkpoint's own model_type, for messages
    # llama family
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # frozen dict items
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] | None = None   # the layers that slide; None: every one
    # opt family
    word_embed_proj_dim: int = 0     # 0 -> hidden_size; opt-350m uses 512
    do_layer_norm_before: bool = True
    norm_affine: bool = True         # False: LayerNorms without weight or bias
    final_norm: bool = True          # False: no LayerNorm before the head (a pre-LN OPT may drop it)
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.family not in ("opt", "llama"):
            raise UnknownModelError(f"unknown model family {self.family!r}")
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    # ------------------------------------------------------------------ views
    @property
    def rope_params(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        p = self.rope_params
        return p.get("rope_type", p.get("type", "default")) or "default"

    @property
    def context_length(self) -> int:
        """Longest sequence the model serves. Dynamic-NTK and YaRN scaling exist to
        stretch the trained window, so (as vLLM does) they extend it by their factor."""
        p = self.rope_params
        factor = float(p.get("factor", 1.0))
        if self.rope_type == "dynamic":
            return int(self.max_position * factor)
        if self.rope_type == "yarn":
            orig = int(p.get("original_max_position_embeddings", self.max_position))
            return max(self.max_position, int(orig * factor))
        return self.max_position

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer``'s attention (None: it sees the whole context)."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def num_params(self) -> int:
        """Parameter count, from the family's own weight shapes (tied heads counted once)."""
        from .models import get_model
        return sum(math.prod(s) for g in get_model(self).shapes().values() for s in g.values())

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_hf(cls, cfg: str | os.PathLike | Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From a Hugging Face ``config.json`` (a path, a model dir or the parsed dict)."""
        if not isinstance(cfg, Mapping):
            path = os.fspath(cfg)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ModelNotFoundError(f"no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        c = dict(cfg)
        mtype = c.get("model_type", "")
        family = _HF_FAMILIES.get(mtype)
        if family is None:
            raise UnknownModelError(
                f"unsupported model_type {mtype!r}; supported: {', '.join(sorted(_HF_FAMILIES))}")
        try:
            return _HF_READERS[family](c, mtype, name)
        except KeyError as e:
            raise CheckpointError(f"config.json lacks required field {e}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From GGUF metadata (key -> python value, as ``weights.gguf`` returns)."""
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "mistral"):
            raise UnknownModelError(f"unsupported GGUF architecture {arch!r} (supported: llama, qwen2, mistral)")

        def get(key: str, default: Any = KeyError) -> Any:
            v = meta.get(f"{arch}.{key}", default)
            if v is KeyError:
                raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
            return v

        heads = int(get("attention.head_count"))
        hidden = int(get("embedding_length"))
        rope_dim = int(get("rope.dimension_count", 0)) or 0
        head_dim = int(get("attention.key_length", 0)) or rope_dim or hidden // heads
        kv = get("attention.head_count_kv", heads)
        scaling = None
        stype = get("rope.scaling.type", None)
        if stype and stype != "none":
            factor = float(get("rope.scaling.factor", 1.0))
            s = {"rope_type": stype, "factor": factor}
            orig = get("rope.scaling.original_context_length", None)
            if orig:
                s["original_max_position_embeddings"] = int(orig)
            scaling = tuple(sorted(s.items()))
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(get("vocab_size", 0)) or (len(tokens) if tokens is not None else 0)
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            family="llama", arch=arch, name=name or str(meta.get("general.name", "")),
            vocab_size=vocab, hidden_size=hidden, num_layers=int(get("block_count")),
            num_heads=heads, num_kv_heads=int(kv if not isinstance(kv, (list, tuple)) else kv[0]),
            head_dim=head_dim, ffn_dim=int(get("feed_forward_length")),
            max_position=int(get("context_length")),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=scaling,
            qkv_bias=arch == "qwen2", tie_word_embeddings=True,  # fixed up by the loader
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
        )

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """A known shape by name, e.g. ``opt-30b`` or ``llama-3.1-8b``."""
        key = name.lower().split("/")[-1]
        if key not in KNOWN_SHAPES:
            raise UnknownModelError(
                f"unknown model name {name!r}; known: {', '.join(KNOWN_SHAPES)}")
        return replace(KNOWN_SHAPES[key], name=key)

    def with_(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


def _eos_tuple(v: Any) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v),)


def _opt_from_hf(c: dict, mtype: str, name: str) -> ModelConfig:
    hidden = c["hidden_size"]
    return ModelConfig(
        family="opt", arch=mtype, name=name, vocab_size=c["vocab_size"], hidden_size=hidden,
        num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
        ffn_dim=c["ffn_dim"], max_position=c["max_position_embeddings"], norm_eps=1e-5,
        activation=c.get("activation_function", "relu"),
        word_embed_proj_dim=c.get("word_embed_proj_dim") or hidden,
        do_layer_norm_before=c.get("do_layer_norm_before", True),
        norm_affine=c.get("layer_norm_elementwise_affine", True),
        final_norm=not c.get("_remove_final_layer_norm", False),
        qkv_bias=c.get("enable_bias", True), o_bias=c.get("enable_bias", True),
        mlp_bias=c.get("enable_bias", True),
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos_tuple(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _llama_from_hf(c: dict, mtype: str, name: str) -> ModelConfig:
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older
    # checkpoints write rope_theta and rope_scaling at the top level.
    rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rtype not in (None, "default"):
        rope["rope_type"] = rtype
        rope.pop("type", None)
        scaling = tuple(sorted((k, v) for k, v in rope.items() if v is not None))
    heads = c["num_attention_heads"]
    hidden = c["hidden_size"]
    sliding, sliding_layers = c.get("sliding_window"), None
    if mtype == "qwen2":
        sliding, sliding_layers = _qwen2_windows(c)
    # Qwen2 always has q/k/v biases and never others, whatever attention_bias says
    qkv_bias = True if mtype == "qwen2" else c.get("attention_bias", False)
    o_bias = False if mtype == "qwen2" else c.get("attention_bias", False)
    mlp_bias = False if mtype == "qwen2" else c.get("mlp_bias", False)
    return ModelConfig(
        family="llama", arch=mtype, name=name, vocab_size=c["vocab_size"], hidden_size=hidden,
        num_layers=c["num_hidden_layers"], num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads, ffn_dim=c["intermediate_size"],
        max_position=c.get("max_position_embeddings", 2048), norm_eps=c.get("rms_norm_eps", 1e-6),
        activation=c.get("hidden_act", "silu"), rope_theta=float(theta), rope_scaling=scaling,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=sliding,
        sliding_layers=sliding_layers,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"), eos_token_ids=_eos_tuple(c.get("eos_token_id")),
        pad_token_id=c.get("pad_token_id"),
    )


def _qwen2_windows(c: dict) -> tuple[int | None, tuple[int, ...] | None]:
    """Qwen2's window and the layers it applies to: with use_sliding_window, the layers
    ``layer_types`` marks sliding, or by default those from ``max_window_layers`` on."""
    window = c.get("sliding_window")
    if not c.get("use_sliding_window", False) or window is None:
        return None, None
    n = c["num_hidden_layers"]
    types = c.get("layer_types") or ["sliding_attention" if i >= c.get("max_window_layers", 28) else "full_attention"
                                     for i in range(n)]
    if len(types) != n:
        raise CheckpointError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, layers) if layers else (None, None)


_HF_READERS = {"opt": _opt_from_hf, "llama": _llama_from_hf}


def _opt(h: int, layers: int, heads: int, **kw: Any) -> ModelConfig:
    return ModelConfig(family="opt", arch="opt", vocab_size=50272, hidden_size=h, num_layers=layers,
                       num_heads=heads, ffn_dim=4 * h, max_position=2048, activation="relu",
                       qkv_bias=True, o_bias=True, mlp_bias=True, bos_token_id=2,
                       eos_token_ids=(2,), pad_token_id=1, **kw)


def _llama(h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int,
           theta: float, arch: str = "llama", **kw: Any) -> ModelConfig:
    kw.setdefault("tie_word_embeddings", False)
    return ModelConfig(family="llama", arch=arch, vocab_size=vocab, hidden_size=h, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv, ffn_dim=ffn, max_position=ctx,
                       rope_theta=theta, **kw)


_LLAMA3_ROPE = tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}.items()))

# Published shapes, for benchmarks and planning without downloads.
KNOWN_SHAPES: dict[str, ModelConfig] = {
    "opt-125m": _opt(768, 12, 12),
    "opt-350m": _opt(1024, 24, 16, word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-2.7b": _opt(2560, 32, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "llama-2-7b": _llama(4096, 32, 32, 32, 11008, 32000, 4096, 1e4, norm_eps=1e-5,
                         bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-13b": _llama(5120, 40, 40, 40, 13824, 32000, 4096, 1e4, norm_eps=1e-5,
                          bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-70b": _llama(8192, 80, 64, 8, 28672, 32000, 4096, 1e4, norm_eps=1e-5,
                          bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, 131072, 5e5, norm_eps=1e-5,
                           rope_scaling=_LLAMA3_ROPE, bos_token_id=128000,
                           eos_token_ids=(128001, 128008, 128009)),
    "llama-3.1-70b": _llama(8192, 80, 64, 8, 28672, 128256, 131072, 5e5, norm_eps=1e-5,
                            rope_scaling=_LLAMA3_ROPE, bos_token_id=128000,
                            eos_token_ids=(128001, 128008, 128009)),
    "mistral-7b": _llama(4096, 32, 32, 8, 14336, 32768, 32768, 1e6, arch="mistral",
                         norm_eps=1e-5, bos_token_id=1, eos_token_ids=(2,)),
    "qwen2-7b": _llama(3584, 28, 28, 4, 18944, 152064, 32768, 1e6, arch="qwen2",
                       qkv_bias=True, bos_token_id=151643, eos_token_ids=(151643,)),
    "smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, 8192, 1e5, norm_eps=1e-5,
                           tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
                           pad_token_id=2),
}
