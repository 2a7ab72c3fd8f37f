"""Roofline inputs (disk read bandwidth, matmul rates) and the roofline.

Measured inside the same memory cap as the systems under test (the
orchestrator runs ``python benchmarks/roofline.py --probe ...`` via
``run_capped``):

* disk: sequential reads of the model file with O_DIRECT (page cache
  bypassed) into a page-aligned buffer with ``os.preadv``, one stream and
  several concurrent streams; plus a buffered read after evicting the file,
  which is the path mmap/safetensors loaders take;
* compute: ``F.linear`` in bf16 (and float32 with ``--dtypes``) at one OPT
  layer's shapes (q, k, v, out, fc1, fc2) and the LM head, for each decode
  batch size, and at prefill size.

The roofline for one decode step of a block of B sequences is
``max(disk_bytes / disk_bw, flops / matmul_rate)``: no schedule can stream
the weights it does not keep in RAM faster than the disk, or do the step's
arithmetic faster than the matmul rate.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ALIGN = 4096


# ---------------------------------------------------------------- disk

def _aligned_buffer(nbytes: int) -> mmap.mmap:
    # anonymous mmap memory is page aligned, as O_DIRECT needs
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _direct_read_range(path: str, start: int, end: int, chunk: int) -> int:
    """Read [start, end) of ``path`` with O_DIRECT; returns bytes read."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = _aligned_buffer(chunk)
    got = 0
    try:
        off = start
        while off < end:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            got += min(n, end - off)
            off += n
            if n < chunk:  # end of file (short final read)
                break
    finally:
        buf.close()
        os.close(fd)
    return got


def disk_read_direct(path: str, nbytes: int, chunk: int = 16 << 20, streams: int = 1) -> dict[str, float]:
    """O_DIRECT sequential read of the first ``nbytes`` of ``path`` split into
    ``streams`` contiguous ranges read concurrently."""
    size = min(os.path.getsize(path), nbytes)
    per = -(-size // streams)
    per = -(-per // ALIGN) * ALIGN
    results = [0] * streams

    def work(i: int) -> None:
        s = i * per
        results[i] = _direct_read_range(path, s, min(size, s + per), chunk) if s < size else 0

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    total = sum(results)
    return {"bytes": total, "seconds": round(dt, 4), "GBps": total / dt / 1e9,
            "chunk": chunk, "streams": streams}


def disk_read_buffered(path: str, nbytes: int, chunk: int = 16 << 20) -> dict[str, float]:
    """Plain read() after evicting the file from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(chunk)
        view = memoryview(buf)
        got = 0
        t0 = time.perf_counter()
        while got < nbytes:
            n = os.readv(fd, [view])
            if n <= 0:
                break
            got += n
        dt = time.perf_counter() - t0
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return {"bytes": got, "seconds": round(dt, 4), "GBps": got / dt / 1e9, "chunk": chunk}


# ---------------------------------------------------------------- compute

@dataclass(frozen=True)
class Shape:
    """The transformer dims the roofline needs (OPT naming)."""
    hidden: int
    ffn: int
    layers: int
    vocab: int
    heads: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Shape":
        return cls(hidden=cfg["hidden_size"], ffn=cfg["ffn_dim"], layers=cfg["num_hidden_layers"],
                   vocab=cfg["vocab_size"], heads=cfg["num_attention_heads"])

    def layer_matmuls(self) -> list[tuple[int, int]]:
        """(in, out) of each weight matrix in one layer."""
        h, f = self.hidden, self.ffn
        return [(h, h)] * 4 + [(h, f), (f, h)]

    def layer_weight_bytes(self, bytes_per: int = 2) -> int:
        h, f = self.hidden, self.ffn
        mats = 4 * h * h + 2 * h * f
        vecs = 4 * h + f + h + 4 * h  # biases + two layer norms
        return (mats + vecs) * bytes_per

    def weight_bytes(self, bytes_per: int = 2, max_pos: int = 2048) -> int:
        embed = (self.vocab + max_pos + 2) * self.hidden + 2 * self.hidden
        return self.layers * self.layer_weight_bytes(bytes_per) + embed * bytes_per

    def layer_flops(self, ctx: int) -> float:
        """FLOPs for one token through one layer with ``ctx`` cached positions
        (matmuls, attention scores and values)."""
        return 2 * sum(i * o for i, o in self.layer_matmuls()) + 4 * ctx * self.hidden

    def head_flops(self) -> float:
        return 2 * self.hidden * self.vocab

    def token_flops(self, ctx: int) -> float:
        """One decoded token through the whole model, LM head included."""
        return self.layers * self.layer_flops(ctx) + self.head_flops()

    def kv_bytes(self, batch: int, seq: int, bytes_per: int = 2) -> int:
        return 2 * self.layers * batch * seq * self.hidden * bytes_per


def matmul_rate(shape: Shape, rows: int, head_rows: int, min_time: float = 0.5,
                threads: int = 0, dtype: str = "bfloat16") -> dict[str, float]:
    """Matmul rate (bf16 by default) of one model step on ``rows`` tokens: one layer's six
    matmuls (timed, times the layer count) plus the LM head on ``head_rows``
    tokens (decode: every token; prefill: the last token of each sequence).
    GFLOPs is the effective rate, step FLOPs / step matmul time."""
    import torch
    import torch.nn.functional as F
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    ws = [(torch.randn(o, i, generator=g) * 0.02).to(dt) for i, o in shape.layer_matmuls()]
    xs = {i: torch.randn(rows, i, generator=g).to(dt) for i, _ in shape.layer_matmuls()}
    head = (torch.randn(shape.vocab, shape.hidden, generator=g) * 0.02).to(dt)
    xh = torch.randn(head_rows, shape.hidden, generator=g).to(dt)

    def timed(fn) -> float:
        fn()  # warm-up (thread pool, kernels)
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time and n >= 2:
                return dt / n

    layer_s = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in ws])
    head_s = timed(lambda: F.linear(xh, head))
    step_s = shape.layers * layer_s + head_s
    flops = 2 * rows * shape.layers * sum(i * o for i, o in shape.layer_matmuls()) + head_rows * shape.head_flops()
    return {"rows": rows, "head_rows": head_rows, "GFLOPs": flops / step_s / 1e9,
            "layer_GFLOPs": 2 * rows * sum(i * o for i, o in shape.layer_matmuls()) / layer_s / 1e9,
            "layer_s": layer_s, "head_s": head_s, "step_matmul_s": step_s,
            "threads": torch.get_num_threads()}


def probe(model_dir: str, batches: list[int], prompt_len: int, disk_bytes: int,
          streams: list[int], dtypes: tuple[str, ...] = ("bfloat16",)) -> dict[str, object]:
    """Everything the roofline needs, measured here and now."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    shape = Shape.from_config(cfg)
    files = sorted(str(p) for p in Path(model_dir).glob("*.safetensors"))
    path = max(files, key=os.path.getsize)
    out: dict[str, object] = {"model_file": path, "file_bytes": os.path.getsize(path)}
    direct = [disk_read_direct(path, disk_bytes, streams=s) for s in streams]
    out["disk_direct"] = direct
    out["disk_buffered"] = disk_read_buffered(path, disk_bytes)
    out["disk_GBps"] = max(d["GBps"] for d in direct)
    import torch
    base_rss = _rss()
    for dtype in dtypes:
        # keys without a suffix are bf16 (what older result files hold)
        sfx = "" if dtype == "bfloat16" else f"_{dtype}"
        out[f"matmul_decode{sfx}"] = {str(b): matmul_rate(shape, b, b, dtype=dtype) for b in batches}
        # prefill: B*P rows through the layers (capped at 2048 rows: the rate has
        # saturated by then), LM head on the last token only
        out[f"matmul_prefill{sfx}"] = {str(b): matmul_rate(shape, min(b * prompt_len, 2048), b, min_time=0.3,
                                                           dtype=dtype) for b in batches}
    out["process_rss_bytes"] = base_rss
    out["torch"] = torch.__version__
    return out


def _rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


# ---------------------------------------------------------------- roofline

def decode_roofline(shape: Shape, batch: int, ctx: int, disk_bytes: float, disk_bw: float,
                    gflops: float) -> dict[str, float]:
    """Lower bound on one decode step's time for a block of ``batch`` sequences
    that reads ``disk_bytes`` of weights from disk per step."""
    io_s = disk_bytes / disk_bw
    flops = batch * shape.token_flops(ctx)
    comp_s = flops / (gflops * 1e9)
    step = max(io_s, comp_s)
    return {"disk_bytes": disk_bytes, "io_s": io_s, "flops": flops, "compute_s": comp_s,
            "step_s": step, "bound": "disk" if io_s >= comp_s else "compute",
            "decode_tok_s": batch / step}


def total_roofline(shape: Shape, batch: int, prompt_len: int, gen_len: int, disk_bytes: float,
                   disk_bw: float, gflops_decode: float, gflops_prefill: float) -> dict[str, float]:
    """Prefill + (gen_len - 1) decode steps, each at its own roofline; tokens/s
    in the paper's metric (generated tokens / total time)."""
    pre_flops = batch * (shape.layers * sum(shape.layer_flops(i) for i in range(prompt_len))
                         + shape.head_flops())  # logits for the last prompt token only
    pre_s = max(disk_bytes / disk_bw, pre_flops / (gflops_prefill * 1e9))
    dec = [decode_roofline(shape, batch, prompt_len + i, disk_bytes, disk_bw, gflops_decode)["step_s"]
           for i in range(1, gen_len)]
    total = pre_s + sum(dec)
    return {"prefill_s": pre_s, "decode_s": sum(dec), "total_s": total,
            "prefill_tok_s": batch * prompt_len / pre_s, "total_tok_s": batch * gen_len / total}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="measure and print one JSON line")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--disk-bytes", type=float, default=4e9, help="read at most this much per test")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    a = ap.parse_args(argv)
    print(json.dumps(probe(a.model_dir, a.batches, a.prompt_len, int(a.disk_bytes), a.streams,
                           tuple(a.dtypes))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
