"""ModelConfig: one frozen dataclass describing every supported family.

Two families of math exist (``models/opt.py`` and ``models/llama.py``); the
many checkpoint dialects (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2, OPT) are just
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
_HF_FAMILIES = {"opt": "opt", "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama"}
# GGUF general.architecture values the llama family reads.
_GGUF_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


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
    qk_norm: bool = False            # an RMSNorm over each head's queries and keys before RoPE (Qwen3)
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
        _check_fields(self)   # before the defaults below divide by num_heads
        if self.num_kv_heads == 0:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.word_embed_proj_dim == 0:
            object.__setattr__(self, "word_embed_proj_dim", self.hidden_size)
        # hidden_size < num_heads leaves a derived head_dim of 0
        _positive_int(self.head_dim, "ModelConfig.head_dim")
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
        c = _hf_json(cfg)
        mtype = c.get("model_type", "")
        family = _HF_FAMILIES.get(mtype) if isinstance(mtype, str) else None
        if family is None:
            raise UnknownModelError(
                f"unsupported model_type {_show(mtype)}; supported: {', '.join(sorted(_HF_FAMILIES))}")
        try:
            return _HF_READERS[family](c, mtype, name)
        except KeyError as e:
            raise CheckpointError(f"config.json lacks required field {e}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], name: str = "") -> "ModelConfig":
        """From GGUF metadata (key -> python value, as ``weights.gguf`` returns)."""
        arch = meta.get("general.architecture")
        if arch not in _GGUF_ARCHS:
            raise UnknownModelError(
                f"unsupported GGUF architecture {_show(arch)} (supported: {', '.join(_GGUF_ARCHS)})")

        def get(key: str, default: Any = KeyError) -> Any:
            v = meta.get(f"{arch}.{key}", default)
            if v is KeyError:
                raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
            return v

        def count(key: str, default: Any = KeyError) -> int:
            return _positive_int(get(key, default), f"GGUF {arch}.{key}")

        def optional_count(key: str) -> int | None:
            return None if get(key, None) is None else count(key)

        def number(key: str, default: float) -> float:
            return _positive_number(get(key, default), f"GGUF {arch}.{key}")

        heads = count("attention.head_count")
        hidden = count("embedding_length")
        head_dim = (optional_count("attention.key_length") or optional_count("rope.dimension_count")
                    or hidden // heads)
        kv = get("attention.head_count_kv", heads)
        kv = kv[0] if isinstance(kv, list) and kv else kv   # a per-layer list: its first entry
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = optional_count("vocab_size") or (len(tokens) if isinstance(tokens, list) else 0)
        if not vocab:
            raise CheckpointError(f"GGUF metadata lacks {arch}.vocab_size and tokenizer.ggml.tokens")
        return cls(
            family="llama", arch=arch, name=name or str(meta.get("general.name", "")),
            vocab_size=vocab, hidden_size=hidden, num_layers=count("block_count"), num_heads=heads,
            num_kv_heads=_positive_int(kv, f"GGUF {arch}.attention.head_count_kv"),
            head_dim=head_dim, ffn_dim=count("feed_forward_length"), max_position=count("context_length"),
            norm_eps=number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=number("rope.freq_base", 10000.0), rope_scaling=_gguf_rope(arch, get),
            qkv_bias=arch == "qwen2", tie_word_embeddings=True,  # fixed up by the loader
            qk_norm=arch == "qwen3",
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_eos_tuple(meta.get("tokenizer.ggml.eos_token_id"),
                                     "GGUF tokenizer.ggml.eos_token_id"),
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


# ------------------------------------------------------------------ checks
# Every check names the field as its file spells it, so a broken checkpoint
# gets one line saying what to fix instead of a traceback from the model code.

_REQUIRED = object()   # a field's default when the file must have it


def _show(v: Any) -> str:
    # a whole list or nested object would not keep the message to one line
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_int(v: Any) -> bool:
    # bool is an int in Python, but `true` for a head count is a broken file, not 1
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any, what: str) -> int:
    if not _is_int(v) or v <= 0:
        raise CheckpointError(f"{what} must be a positive integer, got {_show(v)}")
    return v


def _positive_number(v: Any, what: str) -> float:
    try:
        x = float(v) if _is_int(v) or isinstance(v, float) else math.nan
    except OverflowError:   # an int beyond float's range
        x = math.inf
    if not (math.isfinite(x) and x > 0):
        raise CheckpointError(f"{what} must be a positive finite number, got {_show(v)}")
    return x


def _check_fields(cfg: ModelConfig) -> None:
    """A config built in code (not read from a file) gets the same checks, by field name."""
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_dim", "max_position"):
        _positive_int(getattr(cfg, f), f"ModelConfig.{f}")
    for f in ("num_kv_heads", "head_dim", "word_embed_proj_dim"):   # 0: derived from the others
        v = getattr(cfg, f)
        if not (_is_int(v) and v == 0):
            _positive_int(v, f"ModelConfig.{f}")
    if cfg.sliding_window is not None:
        _positive_int(cfg.sliding_window, "ModelConfig.sliding_window")
    _positive_number(cfg.norm_eps, "ModelConfig.norm_eps")
    _positive_number(cfg.rope_theta, "ModelConfig.rope_theta")


def _check_rope_type(rtype: Any, what: str) -> str:
    from .models.rope import ROPE_TYPES   # lazily: rope.py imports this module
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES:
        raise CheckpointError(f"{what}: unsupported rope type {_show(rtype)}; "
                              f"supported: {', '.join(sorted(ROPE_TYPES))}")
    return rtype


def _check_activation(act: Any, what: str) -> str:
    from .models.base import ACTIVATIONS   # lazily: base.py imports this module
    if not isinstance(act, str) or act not in ACTIVATIONS:
        # the same class get_model raises for it, now at read time and naming the field
        raise UnknownModelError(f"{what}: unsupported activation {_show(act)}; "
                                f"supported: {', '.join(sorted(ACTIVATIONS))}")
    return act


def _eos_tuple(v: Any, what: str) -> tuple[int, ...]:
    if v is None:
        return ()
    ids = v if isinstance(v, (list, tuple)) else [v]
    if not all(_is_int(x) for x in ids):
        raise CheckpointError(f"{what} must be a token id or a list of them, got {_show(v)}")
    return tuple(ids)


# ------------------------------------------------------------ HF config.json
def _hf_json(cfg: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The parsed config.json: ``cfg`` itself, or read from a path or model dir."""
    where = "config.json"
    if isinstance(cfg, (str, os.PathLike)):
        where = os.fspath(cfg)
        if os.path.isdir(where):
            where = os.path.join(where, "config.json")
        if not os.path.isfile(where):
            raise ModelNotFoundError(f"no config.json at {where}")
        try:
            with open(where, encoding="utf-8") as f:
                cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: not valid JSON ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot read it ({e.strerror or e})") from None
    if not isinstance(cfg, Mapping):
        raise CheckpointError(f"{where}: not a JSON object (its top level is a {type(cfg).__name__})")
    return dict(cfg)


def _hf_int(c: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> int:
    """c[key], a positive int; absent gives ``default`` (a KeyError where it has none)."""
    if key not in c and default is not _REQUIRED:
        return default
    return _positive_int(c[key], f"config.json: {key}")


def _hf_optional_int(c: Mapping[str, Any], key: str) -> int | None:
    """c[key], a positive int, or None where absent or null (transformers' own "derive it")."""
    v = c.get(key)
    return None if v is None else _positive_int(v, f"config.json: {key}")


def _hf_number(c: Mapping[str, Any], key: str, default: float) -> float:
    return _positive_number(c.get(key, default), f"config.json: {key}")


def _hf_rope(c: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    """rope_theta and the scaling items. transformers >= 5 writes rope_parameters (with
    rope_theta inside); older checkpoints write rope_theta and rope_scaling at the top level."""
    key = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    raw = c.get(key) or {}
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"config.json: {key} must be an object, got {_show(raw)}")
    rope = dict(raw)
    if "rope_theta" in rope:
        theta = _positive_number(rope.pop("rope_theta"), f"config.json: {key}.rope_theta")
    else:
        theta = _hf_number(c, "rope_theta", 10000.0)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype in (None, "default"):
        return theta, None
    # refused here, not at the first generate, where rope.py would raise
    rope["rope_type"] = _check_rope_type(rtype, f"config.json: {key}")
    rope.pop("type", None)
    if rope.get("factor") is not None:   # context_length multiplies by it
        _positive_number(rope["factor"], f"config.json: {key}.factor")
    if rope.get("original_max_position_embeddings") is not None:
        _positive_int(rope["original_max_position_embeddings"],
                      f"config.json: {key}.original_max_position_embeddings")
    return theta, tuple(sorted((k, v) for k, v in rope.items() if v is not None))


def _gguf_rope(arch: str, get: Any) -> tuple[tuple[str, Any], ...] | None:
    """The scaling items from GGUF's rope.scaling.* keys (None: plain RoPE)."""
    stype = get("rope.scaling.type", None)
    if not stype and get("rope.scale_linear", None) is not None:   # the older spelling of linear scaling
        factor = _positive_number(get("rope.scale_linear", None), f"GGUF {arch}.rope.scale_linear")
        return None if factor == 1.0 else (("factor", factor), ("rope_type", "linear"))
    if not stype or stype == "none":
        return None
    s: dict[str, Any] = {"rope_type": _check_rope_type(stype, f"GGUF {arch}.rope.scaling.type"),
                         "factor": _positive_number(get("rope.scaling.factor", 1.0),
                                                    f"GGUF {arch}.rope.scaling.factor")}
    orig = get("rope.scaling.original_context_length", None)
    if orig:
        s["original_max_position_embeddings"] = _positive_int(
            orig, f"GGUF {arch}.rope.scaling.original_context_length")
    return tuple(sorted(s.items()))


def _opt_from_hf(c: dict, mtype: str, name: str) -> ModelConfig:
    hidden = _hf_int(c, "hidden_size")
    return ModelConfig(
        family="opt", arch=mtype, name=name, vocab_size=_hf_int(c, "vocab_size"), hidden_size=hidden,
        num_layers=_hf_int(c, "num_hidden_layers"), num_heads=_hf_int(c, "num_attention_heads"),
        ffn_dim=_hf_int(c, "ffn_dim"), max_position=_hf_int(c, "max_position_embeddings"),
        norm_eps=1e-5,
        activation=_check_activation(c.get("activation_function", "relu"),
                                     "config.json: activation_function"),
        word_embed_proj_dim=_hf_optional_int(c, "word_embed_proj_dim") or hidden,
        do_layer_norm_before=c.get("do_layer_norm_before", True),
        norm_affine=c.get("layer_norm_elementwise_affine", True),
        final_norm=not c.get("_remove_final_layer_norm", False),
        qkv_bias=c.get("enable_bias", True), o_bias=c.get("enable_bias", True),
        mlp_bias=c.get("enable_bias", True),
        tie_word_embeddings=c.get("tie_word_embeddings", True),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos_tuple(c.get("eos_token_id"), "config.json: eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
    )


def _llama_from_hf(c: dict, mtype: str, name: str) -> ModelConfig:
    # checked before head_dim's default divides by them
    heads = _hf_int(c, "num_attention_heads")
    hidden = _hf_int(c, "hidden_size")
    layers = _hf_int(c, "num_hidden_layers")
    theta, scaling = _hf_rope(c)
    sliding, sliding_layers = _hf_optional_int(c, "sliding_window"), None
    head_dim = _hf_optional_int(c, "head_dim")
    max_position = _hf_int(c, "max_position_embeddings", 32768 if mtype == "qwen3" else 2048)
    qkv_bias = o_bias = c.get("attention_bias", False)
    mlp_bias = c.get("mlp_bias", False)
    if mtype == "qwen2":
        sliding, sliding_layers = _qwen2_windows(c, sliding, layers)
        # Qwen2 always has q/k/v biases and never others, whatever attention_bias says
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif mtype == "qwen3":
        # Qwen3Config's own defaults where the file is silent: a window of 4096 (used only with
        # use_sliding_window), a head size of 128 (not hidden_size / heads) and a context of 32768
        if "sliding_window" not in c:
            sliding = 4096
        sliding, sliding_layers = _qwen2_windows(c, sliding, layers)
        if "head_dim" not in c:
            head_dim = 128
        # attention_bias gives q, k, v and o their biases; the MLP never has any
        mlp_bias = False
    return ModelConfig(
        family="llama", arch=mtype, name=name, vocab_size=_hf_int(c, "vocab_size"), hidden_size=hidden,
        num_layers=layers, num_heads=heads,
        num_kv_heads=_hf_optional_int(c, "num_key_value_heads") or heads,
        head_dim=head_dim or _derived_head_dim(hidden, heads),
        ffn_dim=_hf_int(c, "intermediate_size"),
        max_position=max_position,
        norm_eps=_hf_number(c, "rms_norm_eps", 1e-6),
        activation=_check_activation(c.get("hidden_act", "silu"), "config.json: hidden_act"),
        rope_theta=theta, rope_scaling=scaling,
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, qk_norm=mtype == "qwen3", sliding_window=sliding,
        sliding_layers=sliding_layers,
        tie_word_embeddings=c.get("tie_word_embeddings", False),
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=_eos_tuple(c.get("eos_token_id"), "config.json: eos_token_id"),
        pad_token_id=c.get("pad_token_id"),
    )


def _derived_head_dim(hidden: int, heads: int) -> int:
    if hidden < heads:   # the floor division would give a head size of 0
        raise CheckpointError(
            f"config.json: hidden_size {hidden} is smaller than num_attention_heads {heads}")
    return hidden // heads


def _qwen2_windows(c: dict, window: int | None, n: int) -> tuple[int | None, tuple[int, ...] | None]:
    """Qwen2's (and Qwen3's) window and the layers it applies to: with use_sliding_window, the layers
    ``layer_types`` marks sliding, or by default those from ``max_window_layers`` on."""
    if not c.get("use_sliding_window", False) or window is None:
        return None, None
    types = c.get("layer_types") or _sliding_from(c.get("max_window_layers", 28), n)
    if not isinstance(types, list):
        raise CheckpointError(f"config.json: layer_types must be a list, got {_show(types)}")
    if len(types) != n:
        raise CheckpointError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, layers) if layers else (None, None)


def _sliding_from(first: Any, n: int) -> list[str]:
    """The layer types max_window_layers implies: sliding from layer ``first`` on."""
    if not _is_int(first) or first < 0:
        raise CheckpointError(
            f"config.json: max_window_layers must be a non-negative integer, got {_show(first)}")
    return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]


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
