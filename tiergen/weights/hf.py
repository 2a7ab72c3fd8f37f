"""Hugging Face model directories: config.json plus safetensors (single or sharded)."""
from __future__ import annotations

import json
import os
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, ModelNotFoundError


def safetensors_files(model_dir: str) -> list[str]:
    """The shard files of a model dir, in index order when there is an index."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        pickled = [f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth"))]
        extra = " (tiergen does not load pickle checkpoints such as .bin)" if pickled else ""
        raise ModelNotFoundError(f"no *.safetensors weights in {model_dir}{extra}")
    paths = [os.path.join(model_dir, f) for f in files]
    for p in paths:
        if not os.path.isfile(p):
            raise ModelNotFoundError(f"missing weight shard {p}")
    return paths


def iter_safetensors(paths: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time from memory-mapped files, so loading
    never holds more than the model plus one tensor."""
    for path in paths:
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def checkpoint_dtype(paths: list[str]) -> torch.dtype | None:
    """The floating-point dtype most of a checkpoint's matrices are stored in (header only)."""
    counts: dict[torch.dtype, int] = {}
    try:
        with safe_open(paths[0], framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dt = _ST_DTYPES.get(sl.get_dtype())
                if dt is not None and len(sl.get_shape()) == 2:
                    counts[dt] = counts.get(dt, 0) + 1
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{paths[0]}: corrupt or truncated safetensors file ({e})") from None
    return max(counts, key=counts.get) if counts else None
