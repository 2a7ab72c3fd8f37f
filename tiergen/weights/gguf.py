"""A GGUF reader of our own: header, metadata and tensor index parsed with
``struct``, tensor bytes memory-mapped, common ggml block formats dequantized
with vectorized numpy kernels, and a streaming view under Hugging Face names.

Why not ``gguf.GGUFReader``: it builds one numpy view per vocabulary string,
which costs seconds on a 49k-token vocab; a tight struct loop takes tens of ms,
and model load time is a budget we keep.

File layout (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64
tensor count, u64 metadata count, the metadata key/values, the tensor infos
(name, dims fastest-first, type, offset), padding to ``general.alignment``,
then the tensor data.
"""
from __future__ import annotations

import mmap
import os
import re
import struct

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from ..errors import CheckpointError, ModelNotFoundError
from .ggml import ggml_type_name, _block_sizes, dequantize  # noqa: F401

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf spec).
_STRING, _ARRAY = 8, 9
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
               10: "<Q", 11: "<q", 12: "<d"}
_SCALAR = {t: struct.Struct(f) for t, f in _SCALAR_FMT.items()}
_NUMPY_OF = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1",
             10: "<u8", 11: "<i8", 12: "<f8"}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and what it is."""

    name: str
    shape: tuple[int, ...]   # torch / HF order: GGUF dims reversed
    ggml_type: int
    offset: int              # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

class _Truncated(Exception):
    """Raised inside the parser when a read runs past the end of the file."""

class _Parser:
    """A cursor over the mapped file; every read is bounds-checked."""

    def __init__(self, buf: mmap.mmap, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def unpack(self, st: struct.Struct) -> Any:
        if self.pos + st.size > self.size:
            raise _Truncated
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return v

    def string(self) -> str:
        n = self.unpack(_U64)
        end = self.pos + n
        if end > self.size:
            raise _Truncated
        s = self.buf[self.pos:end].decode("utf-8", "replace")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        st = _SCALAR.get(vtype)
        if st is not None:
            return self.unpack(st)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.unpack(_U32)
            count = self.unpack(_U64)
            return self.array(etype, count)
        raise CheckpointError(f"unknown metadata value type {vtype}")

    def array(self, etype: int, count: int) -> list[Any]:
        left = self.size - self.pos
        if etype in _NUMPY_OF:
            nbytes = count * _SCALAR[etype].size
            if nbytes > left:
                raise _Truncated
            # numpy turns a whole numeric array into python values in one go.
            arr = np.frombuffer(self.buf, dtype=_NUMPY_OF[etype], count=count, offset=self.pos)
            self.pos += nbytes
            return (arr != 0).tolist() if etype == 7 else arr.tolist()
        if etype == _STRING:
            if count * 8 > left:
                raise _Truncated
            return self.strings(count)
        if etype == _ARRAY:
            if count * 12 > left:
                raise _Truncated
            return [self.value(_ARRAY) for _ in range(count)]
        raise CheckpointError(f"unknown metadata array element type {etype}")

    def strings(self, count: int) -> list[str]:
        # The hot loop of the whole reader (vocab and merges): locals only.
        buf, pos, size = self.buf, self.pos, self.size
        unpack = _U64.unpack_from
        out: list[str] = [""] * count
        for i in range(count):
            if pos + 8 > size:
                raise _Truncated
            n = unpack(buf, pos)[0]
            pos += 8
            end = pos + n
            if end > size:
                raise _Truncated
            out[i] = buf[pos:end].decode("utf-8", "replace")
            pos = end
        self.pos = pos
        return out

# ------------------------------------------------------------------ the file
class GGUFFile:
    """One GGUF file: ``metadata`` (key -> python value), ``tensors``
    (name -> TensorInfo, in file order), and tensor data on demand.

    The file stays memory-mapped (copy-on-write, never written) until
    ``close()``; ``raw()`` views into it without copying."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.version = 0
        self.alignment = DEFAULT_ALIGNMENT
        self.data_offset = 0
        if not os.path.exists(self.path):
            raise ModelNotFoundError(f"{self.path}: no such GGUF file")
        if os.path.isdir(self.path):
            raise ModelNotFoundError(f"{self.path}: is a directory, not a GGUF file")
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < _HEADER.size:
                raise CheckpointError(f"{self.path}: header cut short ({size} bytes); truncated file?")
            # ACCESS_COPY: a writable private mapping, so numpy/torch views need
            # no read-only workarounds; nothing ever writes to it.
            self._mm: mmap.mmap | None = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self.size = size
        self._bytes = np.frombuffer(self._mm, dtype=np.uint8)
        try:
            self._parse()
        except _Truncated:
            self.close()
            raise CheckpointError(f"{self.path}: header cut short; truncated file?") from None
        except CheckpointError as e:
            self.close()
            msg = str(e)
            raise CheckpointError(msg if msg.startswith(self.path) else f"{self.path}: {msg}") from None

    # ------------------------------------------------------------- parsing
    def _parse(self) -> None:
        p = _Parser(self._mm, self.size)
        magic, version, n_tensors, n_kv = _HEADER.unpack_from(self._mm, 0)
        p.pos = _HEADER.size
        if magic != GGUF_MAGIC:
            raise CheckpointError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        if version & 0xFFFF == 0 and version:
            raise CheckpointError("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"unsupported GGUF version {version} (supported: 2, 3)")
        self.version = version
        if n_kv > self.size or n_tensors > self.size:
            raise _Truncated
        meta = self.metadata
        for _ in range(n_kv):
            key = p.string()
            meta[key] = p.value(p.unpack(_U32))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise CheckpointError(f"general.alignment {align!r} is not a power of two")
        self.alignment = align

        raw_infos = []
        for _ in range(n_tensors):
            name = p.string()
            n_dims = p.unpack(_U32)
            if n_dims > 8:
                raise CheckpointError(f"tensor {name!r} claims {n_dims} dimensions")
            dims = [p.unpack(_U64) for _ in range(n_dims)]
            raw_infos.append((name, dims, p.unpack(_U32), p.unpack(_U64)))
        self.data_offset = -(-p.pos // align) * align

        for name, dims, ttype, rel in raw_infos:
            self.tensors[name] = self._tensor_info(name, dims, ttype, rel)

    def _tensor_info(self, name: str, dims: list[int], ttype: int, rel: int) -> TensorInfo:
        if name in self.tensors:
            raise CheckpointError(f"duplicate tensor {name!r}")
        sizes = _block_sizes(ttype)
        if sizes is None:
            raise CheckpointError(f"tensor {name!r} has unknown ggml type {ttype}")
        block, type_size = sizes
        numel = 1
        for d in dims:
            numel *= d
        if dims and dims[0] % block:
            raise CheckpointError(
                f"tensor {name!r}: row length {dims[0]} is not a multiple of the "
                f"{ggml_type_name(ttype)} block size {block}")
        nbytes = numel // block * type_size
        start = self.data_offset + rel
        if start + nbytes > self.size:
            raise CheckpointError(
                f"tensor {name!r} data ends at byte {start + nbytes} but the file has "
                f"{self.size}; truncated file?")
        return TensorInfo(name, tuple(reversed(dims)), ttype, start, nbytes)

    # --------------------------------------------------------------- access
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 array viewing the mapped file (no copy)."""
        info = self._info(name)
        return self._view()[info.offset:info.offset + info.nbytes]

    def load(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor dequantized to ``dtype``, in torch/HF shape; a fresh tensor."""
        info = self._info(name)
        flat = dequantize(self.raw(name), info.ggml_type, info.numel, dtype)
        return flat.reshape(info.shape)

    def close(self) -> None:
        """Unmap the file; views handed out by ``raw()`` keep it alive until freed."""
        self._bytes = None  # type: ignore[assignment]
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # exported views still exist; the map goes when they do

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, v{self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def _view(self) -> np.ndarray:
        if self._bytes is None:
            raise ValueError(f"{self.path}: file is closed")
        return self._bytes

# --------------------------------------------------- Hugging Face names/layout
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PARTS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",   # qwen3's per-head norms
}
# Tensors with no HF counterpart: rope_freqs goes into the config (weights/source.py).
_IGNORED = {"rope_freqs.weight"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp's converter interleaves q/k rows for these archs (its rotary
# layout); qwen2 and qwen3 keep HF order. Mistral converts as arch "llama".
_PERMUTED_ARCHS = {"llama", "mistral"}

def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face Llama-style name for a GGUF tensor name, or None."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m is None or m.group(2) not in _LAYER_PARTS:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"

def _head_count(meta: dict[str, Any], key: str, layer: int, default: Any = None) -> int:
    v = meta.get(key, default)
    if v is None:
        raise CheckpointError(f"GGUF metadata lacks {key}")
    return int(v[layer] if isinstance(v, list) else v)

def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head the GGUF rows go
    (pair 0 of half A, pair 0 of half B, ...); HF wants half A then half B."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"cannot split {rows} rows into {n_heads} rotary heads")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

def iter_hf_tensors(f: GGUFFile, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` one tensor at a time, in file order, under
    Hugging Face Llama names and layout; ``lm_head.weight`` only when the file
    has ``output.weight`` (else the embedding is tied)."""
    meta = f.metadata
    arch = meta.get("general.architecture", "")
    permute = arch in _PERMUTED_ARCHS
    for name in f.tensors:
        target = hf_name(name)
        if target is None:
            if name in _IGNORED:
                continue
            raise CheckpointError(f"{f.path}: tensor {name!r} has no Hugging Face counterpart")
        t = f.load(name, dtype)
        if permute and (".attn_q." in name or ".attn_k." in name):
            layer = int(name.split(".")[1])
            heads = _head_count(meta, f"{arch}.attention.head_count", layer)
            if ".attn_k." in name:
                heads = _head_count(meta, f"{arch}.attention.head_count_kv", layer, heads)
            t = unpermute_rows(t, heads)
        yield target, t
